//! Text to training tokens, the way the model was trained to read them: the tokenizer with its
//! BOS rule and the chat template, borrowed together as one [`Codec`]; and [`SoftTargets`], the
//! next-token distributions the engine computes and the trainer learns from.
//!
//! It sits below both `engine` (which answers) and `train::data` (which builds examples), so
//! training data can be tokenised without a whole engine and neither imports the other. It must
//! not run the model or hold state of its own.

use crate::template::ChatTemplate;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Soft targets of one sequence: (token index or position, [(candidate token, probability)]).
pub type SoftTargets = Vec<(usize, Vec<(u32, f32)>)>;

/// A model's tokenizer and chat template, borrowed together.
#[derive(Clone, Copy)]
pub struct Codec<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
}

impl Codec<'_> {
    /// Token ids of `text`, with BOS first when the model adds one.
    pub fn text_tokens(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.tokenizer.encode(text, parse_special)?;
        if self.tokenizer.add_bos {
            if let Some(bos) = self.tokenizer.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }
}
