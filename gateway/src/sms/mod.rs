//! SMS text: per-locale templates, the GSM-7 or UCS-2 choice, and segment counting.
//!
//! Every text the gateway hands to a carrier is built here.
//! [`Templates`] renders the per-locale message with the code, then the optional Android app hash
//! line and the optional WebOTP origin line, which must come last.
//! [`SmsText`] records the encoding the text needs and the number of segments it costs,
//! which is what carriers bill and pace by.
//!
//! # Encoding and segments
//!
//! A text is GSM-7 when every character is in the GSM 03.38 default alphabet or its extension
//! table, where an extension character costs two septets (an escape, then the character).
//! Any other text is UCS-2, counted in UTF-16 code units.
//! One SMS holds 160 septets or 70 units.
//! A longer text travels as concatenated segments of 153 septets or 67 units, because the user
//! data header takes the rest.
//! A split never separates an escape from its character or the halves of a surrogate pair, so the
//! count can exceed a plain division of the length.

mod autofill;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use self::autofill::checked_web_otp_host;
pub use self::autofill::{OriginError, is_valid_app_hash, web_otp_host};

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

/// The SMS templates of every configured locale.
#[derive(Debug, Clone)]
pub struct Templates {
    /// Parsed templates keyed by normalised locale: lowercase, subtags joined by `-`.
    by_locale: BTreeMap<String, Template>,
    default_locale: String,
    /// A copy of the default locale's template, so that a lookup always has an answer.
    default_template: Template,
}

/// What a template is rendered with.
///
/// `Debug` does not print the code.
#[derive(Clone, Copy)]
pub struct RenderParams<'a> {
    /// The one-time code, for `{code}` and the WebOTP line.
    pub code: &'a str,
    /// The code's lifetime, for `{ttl_minutes}`.
    pub ttl_minutes: u64,
    /// The WebOTP host from [`web_otp_host`], such as `portal.example.it`.
    pub web_origin_host: Option<&'a str>,
    /// The Android SMS Retriever hash, checked by [`is_valid_app_hash`].
    pub app_hash: Option<&'a str>,
}

/// Why a set of templates was rejected.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "locale {locale:?}: not a language tag (ASCII letters and digits separated by '-' or '_')"
    )]
    InvalidLocale { locale: String },
    #[error("locale {locale:?}: more than one template")]
    DuplicateLocale { locale: String },
    #[error("default locale {locale:?}: no template for it")]
    MissingDefaultLocale { locale: String },
    #[error("template for locale {locale:?}: empty template")]
    Empty { locale: String },
    #[error("template for locale {locale:?}: missing the {{code}} placeholder")]
    MissingCode { locale: String },
    #[error("template for locale {locale:?}: the {{code}} placeholder appears more than once")]
    DuplicateCode { locale: String },
    #[error("template for locale {locale:?}: unknown placeholder {{{name}}}")]
    UnknownPlaceholder { locale: String, name: String },
    #[error("template for locale {locale:?}: unclosed '{{' at byte {offset}")]
    UnclosedBrace { locale: String, offset: usize },
    #[error("template for locale {locale:?}: unmatched '}}' at byte {offset}")]
    UnmatchedBrace { locale: String, offset: usize },
    #[error(
        "template for locale {locale:?}: a sample with a 10-digit code takes {segments} segments, over the limit of {limit}",
        limit = MAX_TEMPLATE_SEGMENTS
    )]
    TooLong { locale: String, segments: u16 },
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

// === impl Templates ===

impl Templates {
    /// The shipped templates: `en` (the default) and `it`, both GSM-7.
    ///
    /// # Panics
    ///
    /// Never: the built-in templates are constants, and a unit test checks that they are accepted.
    pub fn builtin() -> Templates {
        let by_locale =
            BUILTIN_TEMPLATES.map(|(locale, source)| (locale.to_owned(), source.to_owned()));
        Templates::new(by_locale, "en").expect("built-in templates are valid")
    }

    /// Parses and checks one template per locale.
    ///
    /// Locales are matched case-insensitively, with `_` and `-` equivalent.
    ///
    /// # Errors
    ///
    /// Returns a [`TemplateError`] when a locale is not a language tag or appears twice, the
    /// default locale has no template, or a template is empty, lacks `{code}` or has it twice,
    /// uses a placeholder other than `{code}` and `{ttl_minutes}`, has an unbalanced brace, or
    /// renders to more than three segments with a 10-digit code.
    pub fn new(
        by_locale: impl IntoIterator<Item = (String, String)>,
        default_locale: &str,
    ) -> Result<Templates, TemplateError> {
        let mut parsed = BTreeMap::new();
        for (locale, source) in by_locale {
            let Some(key) = normalise_locale(&locale) else {
                return Err(TemplateError::InvalidLocale { locale });
            };
            let template = Template::parse(&locale, &source)?;
            let sample = SmsText::new(template.render(&SAMPLE_PARAMS));
            if sample.segments() > MAX_TEMPLATE_SEGMENTS {
                return Err(TemplateError::TooLong {
                    locale,
                    segments: sample.segments(),
                });
            }
            if parsed.contains_key(&key) {
                return Err(TemplateError::DuplicateLocale { locale: key });
            }
            parsed.insert(key, template);
        }

        let default = normalise_locale(default_locale)
            .and_then(|key| parsed.get_key_value(&key))
            .map(|(key, template)| (key.clone(), template.clone()));
        let Some((default_locale, default_template)) = default else {
            return Err(TemplateError::MissingDefaultLocale {
                locale: default_locale.to_owned(),
            });
        };
        Ok(Templates {
            by_locale: parsed,
            default_locale,
            default_template,
        })
    }

    /// Whether `locale` has its own template, directly or through its language (`it-IT` → `it`),
    /// rather than falling back to the default.
    pub fn has_locale(&self, locale: &str) -> bool {
        self.find(locale).is_some()
    }

    /// The normalised locale whose template `render` uses for `locale`.
    pub fn resolve_locale(&self, locale: Option<&str>) -> &str {
        locale
            .and_then(|locale| self.find(locale))
            .map_or(self.default_locale.as_str(), |(key, _)| key)
    }

    /// The normalised default locale.
    pub fn default_locale(&self) -> &str {
        &self.default_locale
    }

    /// Renders the text for `locale`, falling back to its language and then to the default locale.
    ///
    /// The template comes first, then the app hash on its own line, then the WebOTP line
    /// `@<host> #<code>`, which WebOTP requires to be the last line.
    /// An app hash that fails [`is_valid_app_hash`], or a host that [`web_otp_host`] would reject,
    /// is left out rather than let it add arbitrary lines to the SMS.
    pub fn render(&self, locale: Option<&str>, params: &RenderParams<'_>) -> SmsText {
        let template = locale
            .and_then(|locale| self.find(locale))
            .map_or(&self.default_template, |(_, template)| template);
        let mut text = template.render(params);
        if let Some(app_hash) = params.app_hash.filter(|hash| is_valid_app_hash(hash)) {
            text.push('\n');
            text.push_str(app_hash);
        }
        if let Some(host) = params.web_origin_host.and_then(checked_web_otp_host) {
            text.push_str("\n@");
            text.push_str(&host);
            text.push_str(" #");
            text.push_str(params.code);
        }
        SmsText::new(text)
    }

    /// Finds the template for `locale` or, failing that, for its shorter prefixes.
    fn find(&self, locale: &str) -> Option<(&str, &Template)> {
        let mut key = normalise_locale(locale)?;
        loop {
            if let Some((key, template)) = self.by_locale.get_key_value(&key) {
                return Some((key.as_str(), template));
            }
            let cut = key.rfind('-')?;
            key.truncate(cut);
        }
    }
}

// === impl RenderParams ===

impl fmt::Debug for RenderParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderParams")
            .field("code", &Redacted)
            .field("ttl_minutes", &self.ttl_minutes)
            .field("web_origin_host", &self.web_origin_host)
            .field("app_hash", &self.app_hash)
            .finish()
    }
}

/// The shipped templates, by locale; a config's `[templates]` add to them or replace them.
pub const BUILTIN_TEMPLATES: [(&str, &str); 2] = [("en", BUILTIN_EN), ("it", BUILTIN_IT)];

// === private ===

const BUILTIN_EN: &str = concat!(
    "Your verification code is {code}. ",
    "It expires in {ttl_minutes} minutes. ",
    "Never share it with anyone.",
);
const BUILTIN_IT: &str = concat!(
    "Il tuo codice di verifica è {code}. ",
    "Scade tra {ttl_minutes} minuti. ",
    "Non condividerlo con nessuno.",
);

/// A template must fit this many segments with [`SAMPLE_PARAMS`], leaving room for the extra lines.
const MAX_TEMPLATE_SEGMENTS: u16 = 3;

/// The worst plausible values, used to check a template's length.
const SAMPLE_PARAMS: RenderParams<'static> = RenderParams {
    code: "0123456789",
    ttl_minutes: 1440,
    web_origin_host: None,
    app_hash: None,
};

const MAX_LOCALE_LEN: usize = 35;
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

/// A parsed template.
#[derive(Debug, Clone)]
struct Template {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone)]
enum Piece {
    Literal(String),
    Code,
    TtlMinutes,
}

/// Prints as `**REDACTED**` in place of a secret.
struct Redacted;

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

// === impl Template ===

impl Template {
    fn parse(locale: &str, source: &str) -> Result<Template, TemplateError> {
        if source.trim().is_empty() {
            return Err(TemplateError::Empty {
                locale: locale.to_owned(),
            });
        }
        let mut pieces = Vec::new();
        let mut n_codes = 0;
        // Everything before `cursor` has been turned into pieces.
        let mut cursor = 0;
        while let Some(found) = source[cursor..].find(['{', '}']) {
            let brace = cursor + found;
            if source[brace..].starts_with('}') {
                return Err(TemplateError::UnmatchedBrace {
                    locale: locale.to_owned(),
                    offset: brace,
                });
            }
            let Some(close) = source[brace..].find('}').map(|close| brace + close) else {
                return Err(TemplateError::UnclosedBrace {
                    locale: locale.to_owned(),
                    offset: brace,
                });
            };
            let piece = match &source[brace + 1..close] {
                "code" => {
                    n_codes += 1;
                    Piece::Code
                }
                "ttl_minutes" => Piece::TtlMinutes,
                name => {
                    return Err(TemplateError::UnknownPlaceholder {
                        locale: locale.to_owned(),
                        name: name.to_owned(),
                    });
                }
            };
            if cursor < brace {
                pieces.push(Piece::Literal(source[cursor..brace].to_owned()));
            }
            pieces.push(piece);
            cursor = close + 1;
        }
        if cursor < source.len() {
            pieces.push(Piece::Literal(source[cursor..].to_owned()));
        }
        match n_codes {
            0 => Err(TemplateError::MissingCode {
                locale: locale.to_owned(),
            }),
            1 => Ok(Template { pieces }),
            _ => Err(TemplateError::DuplicateCode {
                locale: locale.to_owned(),
            }),
        }
    }

    fn render(&self, params: &RenderParams<'_>) -> String {
        let mut text = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(literal) => text.push_str(literal),
                Piece::Code => text.push_str(params.code),
                Piece::TtlMinutes => text.push_str(&params.ttl_minutes.to_string()),
            }
        }
        text
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

/// Lowercases `locale` and writes `_` as `-`, or returns `None` if it is not a language tag.
fn normalise_locale(locale: &str) -> Option<String> {
    if locale.is_empty() || locale.len() > MAX_LOCALE_LEN {
        return None;
    }
    let normalised: String = locale
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let is_tag = normalised
        .split('-')
        .all(|subtag| !subtag.is_empty() && subtag.bytes().all(|b| b.is_ascii_alphanumeric()));
    is_tag.then_some(normalised)
}
