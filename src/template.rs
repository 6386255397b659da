//! Renders a conversation into the prompt text a model was trained on, with the chat template
//! stored in its GGUF file (`tokenizer.chat_template`), run by a real Jinja engine (minijinja,
//! with Python-style string methods, as Hugging Face's templates expect).
//!
//! When a file has no template, a clearly named fallback is used (ChatML when the vocabulary has
//! its tokens, otherwise a plain "User:/Assistant:" layout). It must not tokenize.

use crate::gguf::GgufFile;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

/// Where the template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSource {
    Gguf,
    FallbackChatml,
    FallbackPlain,
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Gguf => "from the model file",
            Self::FallbackChatml => "fallback ChatML (the model file has none)",
            Self::FallbackPlain => "fallback User/Assistant (the model file has none)",
        })
    }
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const PLAIN: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template of {model} does not parse: {source}; hone can't chat with this file (use `hone ask --raw` for plain completion)")]
    Parse {
        model: String,
        source: minijinja::Error,
    },
    #[error("the chat template of {model} failed: {source}")]
    Render {
        model: String,
        source: minijinja::Error,
    },
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: TemplateSource,
    bos: String,
    eos: String,
    model: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// The template of `file`, or a fallback; `bos`/`eos` are the texts of those tokens.
    pub fn from_gguf(file: &GgufFile, bos: &str, eos: &str) -> Result<Self, TemplateError> {
        let has_chatml = file
            .get_str_array("tokenizer.ggml.tokens")
            .map(|t| t.iter().any(|s| s == "<|im_start|>"))
            .unwrap_or(false);
        let (text, source) = match file.get_opt_str("tokenizer.chat_template") {
            Some(t) => (t, TemplateSource::Gguf),
            None if has_chatml => (CHATML.to_string(), TemplateSource::FallbackChatml),
            None => (PLAIN.to_string(), TemplateSource::FallbackPlain),
        };
        Self::new(&text, source, bos, eos, &file.path().display().to_string())
    }

    pub fn new(
        text: &str,
        source: TemplateSource,
        bos: &str,
        eos: &str,
        model: &str,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat".to_string(), text.to_string())
            .map_err(|source| TemplateError::Parse {
                model: model.to_string(),
                source,
            })?;
        Ok(Self {
            env,
            source,
            bos: bos.to_string(),
            eos: eos.to_string(),
            model: model.to_string(),
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let err = |source| TemplateError::Render {
            model: self.model.clone(),
            source,
        };
        let tmpl = self.env.get_template("chat").map_err(err)?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders() {
        let t = ChatTemplate::new(CHATML, TemplateSource::FallbackChatml, "", "", "test").unwrap();
        let s = t
            .render(&[Message::system("Be brief."), Message::user("Hi")], true)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_work() {
        let src = "{% for m in messages %}{{ m.content.strip() }}{% if m.role == 'bad' %}{{ raise_exception('no') }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, TemplateSource::Gguf, "", "", "test").unwrap();
        assert_eq!(t.render(&[Message::user("  x  ")], false).unwrap(), "x");
        assert!(t.render(&[Message::new("bad", "x")], false).is_err());
    }

    #[test]
    fn plain_fallback_capitalises_roles() {
        let t = ChatTemplate::new(PLAIN, TemplateSource::FallbackPlain, "", "", "test").unwrap();
        assert_eq!(
            t.render(&[Message::user("Hi")], true).unwrap(),
            "User: Hi\nAssistant:"
        );
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        assert!(ChatTemplate::new("{% for %}", TemplateSource::Gguf, "", "", "m").is_err());
    }
}
