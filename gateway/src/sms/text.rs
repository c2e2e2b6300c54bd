//! [`SmsText`]: the encoding a text needs (GSM-7 or UCS-2), its units and its segments, and the
//! GSM 03.38 alphabet they are counted by.

use std::fmt;
use std::ops::Range;

/// How a text travels over the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The GSM 03.38 7-bit default alphabet with its extension table.
    Gsm7,
    /// UCS-2 (UTF-16 in practice), for any text GSM-7 cannot carry.
    Ucs2,
}

/// A text ready to send, with the encoding it needs and its cost in segments.
///
/// `Debug` and `Display` never print the text, because it carries the one-time code.
#[derive(Clone, PartialEq, Eq)]
pub struct SmsText {
    text: String,
    encoding: Encoding,
    units: usize,
    /// Saturates at `u16::MAX`, far beyond anything a template can produce.
    segments: u16,
}

/// Converts `text` to GSM 03.38 default-alphabet septets, one per byte, unpacked.
///
/// An extension character becomes the escape `0x1B` followed by its code.
/// Returns `None` when any character is outside the alphabet and its extension table.
pub fn gsm7_unpacked(text: &str) -> Option<Vec<u8>> {
    let mut septets = Vec::with_capacity(text.len());
    for c in text.chars() {
        match gsm7_septet(c)? {
            Septet::Basic(code) => septets.push(code),
            Septet::Extension(code) => septets.extend([GSM7_ESCAPE, code]),
        }
    }
    Some(septets)
}

// === impl Encoding ===

impl Encoding {
    /// The name used in logs and metric labels: `gsm7` or `ucs2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "gsm7",
            Encoding::Ucs2 => "ucs2",
        }
    }

    /// The units (septets or UTF-16 code units) that fit in a single, unsplit SMS.
    pub fn single_segment_units(self) -> usize {
        match self {
            Encoding::Gsm7 => 160,
            Encoding::Ucs2 => 70,
        }
    }

    /// The units that fit in each segment of a concatenated SMS.
    pub fn multipart_segment_units(self) -> usize {
        match self {
            Encoding::Gsm7 => 153,
            Encoding::Ucs2 => 67,
        }
    }
}

// === impl SmsText ===

impl SmsText {
    /// Picks the encoding for `text` and counts its units and segments.
    pub fn new(text: String) -> SmsText {
        let (encoding, units) = analyse(&text);
        let mut n_segments: usize = 0;
        walk_segments(&text, encoding, units, |_| n_segments += 1);
        SmsText {
            segments: u16::try_from(n_segments).unwrap_or(u16::MAX),
            text,
            encoding,
            units,
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Gives the text back, for handing to a carrier without a copy.
    pub fn into_text(self) -> String {
        self.text
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Septets for GSM-7 (an extension character counts two), UTF-16 code units for UCS-2.
    pub fn units(&self) -> usize {
        self.units
    }

    /// The number of SMS segments; an empty text is one segment.
    ///
    /// The count saturates at `u16::MAX` for a text of some ten megabytes or more.
    pub fn segments(&self) -> u16 {
        self.segments
    }

    /// The byte range of `text()` that each segment carries, in order.
    ///
    /// The ranges cover the text exactly, start and end on character boundaries, and there is
    /// one per segment.
    pub fn segment_ranges(&self) -> Vec<Range<usize>> {
        let mut ranges = Vec::with_capacity(usize::from(self.segments));
        walk_segments(&self.text, self.encoding, self.units, |range| {
            ranges.push(range)
        });
        ranges
    }
}

impl fmt::Debug for SmsText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmsText")
            .field("encoding", &self.encoding)
            .field("units", &self.units)
            .field("segments", &self.segments)
            .field("text", &Redacted)
            .finish()
    }
}

impl fmt::Display for SmsText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.segments == 1 { "" } else { "s" };
        write!(
            f,
            "{REDACTED} ({}, {} segment{plural})",
            self.encoding.as_str(),
            self.segments
        )
    }
}

// === private ===

const REDACTED: &str = "**REDACTED**";

pub(crate) const GSM7_ESCAPE: u8 = 0x1B;

/// The GSM 03.38 default alphabet, indexed by septet.
/// Slot `0x1B` is the escape to the extension table, not a character.
#[rustfmt::skip]
pub(crate) const GSM7_BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å',
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1B}', 'Æ', 'æ', 'ß', 'É',
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/',
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?',
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O',
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§',
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o',
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à',
];

/// The GSM 03.38 extension table: each character and the septet that follows the escape.
pub(crate) const GSM7_EXTENSION: [(char, u8); 10] = [
    ('\u{0C}', 0x0A),
    ('^', 0x14),
    ('{', 0x28),
    ('}', 0x29),
    ('\\', 0x2F),
    ('[', 0x3C),
    ('~', 0x3D),
    (']', 0x3E),
    ('|', 0x40),
    ('€', 0x65),
];

#[derive(Debug, Clone, Copy)]
enum Septet {
    Basic(u8),
    Extension(u8),
}

/// Prints as `**REDACTED**` in place of a secret.
pub(crate) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

// === impl Septet ===

impl Septet {
    fn cost(self) -> usize {
        match self {
            Septet::Basic(_) => 1,
            Septet::Extension(_) => 2,
        }
    }
}

/// The septet of each ASCII character, from the two tables above: `-1` when it has none, the
/// basic septet, or `128 +` the extension septet. Most SMS text is ASCII, and this spares a
/// search of the tables for every character.
const ASCII_SEPTETS: [i16; 128] = {
    let mut table = [-1i16; 128];
    let mut index = 0;
    while index < GSM7_BASIC.len() {
        let c = GSM7_BASIC[index] as u32;
        if c < 128 && index != GSM7_ESCAPE as usize {
            table[c as usize] = index as i16;
        }
        index += 1;
    }
    let mut index = 0;
    while index < GSM7_EXTENSION.len() {
        let (c, code) = GSM7_EXTENSION[index];
        if (c as u32) < 128 {
            table[c as usize] = 128 + code as i16;
        }
        index += 1;
    }
    table
};

fn gsm7_septet(c: char) -> Option<Septet> {
    if c.is_ascii() {
        return match ASCII_SEPTETS[c as usize] {
            -1 => None,
            septet @ 0..=127 => Some(Septet::Basic(septet as u8)),
            extension => Some(Septet::Extension((extension - 128) as u8)),
        };
    }
    if let Some(index) = GSM7_BASIC.iter().position(|&basic| basic == c) {
        return u8::try_from(index).ok().map(Septet::Basic);
    }
    GSM7_EXTENSION
        .iter()
        .find(|&&(extension, _)| extension == c)
        .map(|&(_, code)| Septet::Extension(code))
}

/// Picks the encoding for `text` and counts its units.
fn analyse(text: &str) -> (Encoding, usize) {
    let mut septets = 0;
    for c in text.chars() {
        match gsm7_septet(c) {
            Some(septet) => septets += septet.cost(),
            None => return (Encoding::Ucs2, text.encode_utf16().count()),
        }
    }
    (Encoding::Gsm7, septets)
}

/// The units `c` costs in `encoding`.
fn char_units(encoding: Encoding, c: char) -> usize {
    match encoding {
        // A GSM-7 text holds only GSM-7 characters, so the fallback is never taken.
        Encoding::Gsm7 => gsm7_septet(c).map_or(2, Septet::cost),
        Encoding::Ucs2 => c.len_utf16(),
    }
}

/// Calls `on_segment` with the byte range of each segment of `text`, in order.
///
/// Segments are filled greedily, and a character that does not fit whole starts the next one.
fn walk_segments(
    text: &str,
    encoding: Encoding,
    units: usize,
    mut on_segment: impl FnMut(Range<usize>),
) {
    if units <= encoding.single_segment_units() {
        on_segment(0..text.len());
        return;
    }
    let capacity = encoding.multipart_segment_units();
    let mut start = 0;
    let mut used = 0;
    for (index, c) in text.char_indices() {
        let cost = char_units(encoding, c);
        if used + cost > capacity {
            on_segment(start..index);
            start = index;
            used = 0;
        }
        used += cost;
    }
    on_segment(start..text.len());
}
