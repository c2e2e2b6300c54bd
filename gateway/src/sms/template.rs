//! [`Templates`]: each locale's message, parsed and checked once, then rendered with the code and
//! the autofill lines.

use std::collections::BTreeMap;
use std::fmt;

use super::autofill::{checked_web_otp_host, is_valid_app_hash};
use super::text::{Redacted, SmsText};

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
    /// The WebOTP host from [`web_otp_host`](super::web_otp_host), such as `portal.example.it`.
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
    /// An app hash that fails [`is_valid_app_hash`], or a host that
    /// [`web_otp_host`](super::web_otp_host) would reject, is left out rather than let it add
    /// arbitrary lines to the SMS.
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

pub(crate) const BUILTIN_EN: &str = concat!(
    "Your verification code is {code}. ",
    "It expires in {ttl_minutes} minutes. ",
    "Never share it with anyone.",
);
pub(crate) const BUILTIN_IT: &str = concat!(
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
