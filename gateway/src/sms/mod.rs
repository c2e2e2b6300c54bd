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
mod template;
#[cfg(test)]
mod tests;
mod text;

pub use self::autofill::{
    ClientAutofill, NotAllowed, OriginError, is_valid_app_hash, web_otp_host,
};
pub use self::template::{BUILTIN_TEMPLATES, RenderParams, TemplateError, Templates};
pub use self::text::{Encoding, SmsText, gsm7_unpacked};
pub(crate) use self::text::{GSM7_BASIC, GSM7_ESCAPE, GSM7_EXTENSION};
