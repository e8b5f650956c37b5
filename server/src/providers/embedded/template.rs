//! The prompt: the conversation rendered by the model's own chat template
//! (`tokenizer.chat_template`, Jinja), as Hugging Face and llama.cpp render
//! it: `messages` (`system` first when the request has one, then `user` and
//! `assistant` turns), `add_generation_prompt = true`, `bos_token` and
//! `eos_token`, `raise_exception(msg)`, `strftime_now(fmt)`, Python string
//! methods, with `trim_blocks` and `lstrip_blocks` on.
//!
//! A file without a template gets ChatML ([`FALLBACK_TEMPLATE`]), which is
//! also llama.cpp's default.

use minijinja::{Environment, Error, ErrorKind, Value, context};

/// The template used when the model file carries none (ChatML).
pub const FALLBACK_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const NAME: &str = "chat";

/// The work one render may do, in minijinja's fuel (about one instruction,
/// or 64 bytes of data made): a template from a model file, run on a
/// request's conversation, ends within it, in time and in memory (about
/// 640 MB at most). Llama 2's template needs 2 to 5 M of it for 4 MiB of
/// conversation in 40,000 turns, far more than any context holds.
pub(crate) const TEMPLATE_FUEL: u64 = 10_000_000;

/// One turn, as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Turn {
    /// `system`, `user` or `assistant`.
    pub role: &'static str,
    /// The turn's text.
    pub content: String,
}

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    from_file: bool,
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Templates that print today's date (Llama 3.x) call this; the gateway
/// passes no clock-dependent state, so it renders UTC time.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", month_name)
        .replace("%b", &month_name[..3])
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl ChatTemplate {
    /// Compiles the file's template, or the fallback when it has none.
    pub(crate) fn new(source: Option<String>, bos: &str, eos: &str) -> Result<Self, String> {
        let from_file = source.is_some();
        let source = source.unwrap_or_else(|| FALLBACK_TEMPLATE.to_string());
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source)
            .map_err(|e| format!("its chat template does not compile: {e}"))?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
            from_file,
        })
    }

    /// Whether the template came from the model file.
    pub(crate) fn is_from_file(&self) -> bool {
        self.from_file
    }

    /// Renders the conversation, ready for the assistant's turn.
    pub(crate) fn render(&self, turns: &[Turn]) -> Result<String, String> {
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        let messages: Vec<Value> = turns
            .iter()
            .map(|t| {
                Value::from_pairs([
                    ("role", Value::from(t.role)),
                    ("content", Value::from(t.content.as_str())),
                ])
            })
            .collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos.as_str(),
                eos_token => self.eos.as_str(),
            })
            .map_err(|e| {
                let mut msg = format!("the model's chat template failed: {e}");
                if let Some(detail) = e.detail() {
                    msg = format!("the model's chat template refused the conversation: {detail}");
                }
                msg
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns() -> Vec<Turn> {
        vec![
            Turn {
                role: "system",
                content: "Be brief.".into(),
            },
            Turn {
                role: "user",
                content: "Hi".into(),
            },
            Turn {
                role: "assistant",
                content: "Hello!".into(),
            },
            Turn {
                role: "user",
                content: "Bye".into(),
            },
        ]
    }

    #[test]
    fn fallback_is_chatml() {
        let t = ChatTemplate::new(None, "<s>", "</s>").unwrap();
        assert!(!t.is_from_file());
        assert_eq!(
            t.render(&turns()).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    /// Llama 2's template (abridged from the model card's): the system
    /// prompt folds into the first user turn; roles must alternate.
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    #[test]
    fn file_templates_see_roles_tokens_and_python_methods() {
        let t = ChatTemplate::new(Some(LLAMA2.into()), "<s>", "</s>").unwrap();
        assert!(t.is_from_file());
        assert_eq!(
            t.render(&turns()).unwrap(),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"
        );
        let err = t
            .render(&[Turn {
                role: "assistant",
                content: "x".into(),
            }])
            .unwrap_err();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn broken_templates_fail_at_start_up() {
        let err = ChatTemplate::new(Some("{% for %}".into()), "", "")
            .err()
            .unwrap();
        assert!(err.contains("chat template"), "{err}");
    }

    /// A template whose work grows without bound (here 10^10 loop turns)
    /// ends with an error instead of holding its thread.
    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let source =
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(Some(source.into()), "", "").unwrap();
        let err = t.render(&turns()).unwrap_err();
        assert!(err.starts_with("the model's chat template failed"), "{err}");
        assert!(err.to_lowercase().contains("fuel"), "{err}");
    }

    /// The fuel is ample for a conversation as large as a request may be.
    #[test]
    fn a_conversation_of_the_largest_request_renders_within_the_fuel() {
        let t = ChatTemplate::new(Some(LLAMA2.into()), "<s>", "</s>").unwrap();
        // 4 MiB in 40,000 turns of about 100 bytes.
        let turns: Vec<Turn> = (0..40_000)
            .map(|i| Turn {
                role: if i % 2 == 0 { "user" } else { "assistant" },
                content: "y".repeat(100),
            })
            .collect();
        let prompt = t.render(&turns).unwrap();
        assert!(prompt.len() > 4_000_000, "{}", prompt.len());
    }

    #[test]
    fn strftime_now_formats_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let s = strftime_now("%d %b %Y".into());
        assert_eq!(s.len(), 11, "{s}");
    }
}
