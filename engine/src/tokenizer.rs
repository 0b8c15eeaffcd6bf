//! Text ⇄ token ids for one model.
//!
//! [`Tokenizer`] wraps a Hugging Face `tokenizers::Tokenizer` built either from
//! GGUF metadata (`tokenizer.ggml.*`, byte-level BPE only) or from a Hugging
//! Face folder (`tokenizer.json` plus the optional config files), and keeps the
//! special-token facts the engine needs: BOS and whether to add it, every id
//! that ends generation, which ids are special, and the chat template source.
//! [`DecodeStream`] turns generated ids into text one token at a time for
//! streaming, never cutting a UTF-8 character in half.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};

/// GGUF `token_type` of a control token (`<|im_start|>`): special, skipped
/// when decoding with `skip_special`.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of a user-defined token (Qwen's `<think>`): matched whole
/// in the text, but ordinary text when decoding (as in llama.cpp and in the Hugging
/// Face files these GGUFs are converted from).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama-3 pre-tokenizer split (digits in groups of up to three).
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer split (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a vocabulary entry spells the bytes it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceSpelling {
    /// GPT-2 byte-level: each byte is one printable character (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece style: `▁` is a space and `<0x0A>` is a raw byte.
    SentencePiece,
}

/// A model's tokenizer with its special-token facts.
///
/// Special tokens written in the text (`<|im_start|>`) are always recognised
/// as single tokens, so chat prompts can be rendered as text and encoded.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// BOS id and text.
    bos: Option<(u32, String)>,
    /// EOS text.
    eos: Option<String>,
    /// Every id that ends generation, EOS first, without duplicates.
    eos_ids: Vec<u32>,
    /// Whether `encode(.., add_special = true)` prepends BOS.
    add_bos: bool,
    /// Ids of added tokens (special or not): their piece is their raw text.
    added_ids: HashSet<u32>,
    /// Ids of special added tokens.
    special_ids: HashSet<u32>,
    spelling: PieceSpelling,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// What a model source says besides the vocabulary, resolved by
/// [`Tokenizer::assemble`].
struct SpecialFacts {
    bos: Option<String>,
    eos: Option<String>,
    add_bos: bool,
    /// Ids that end generation besides EOS.
    extra_eos_ids: Vec<u32>,
    chat_template: Option<String>,
    spelling: PieceSpelling,
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    ///
    /// Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE built from
    /// `tokens` and `merges`) is supported; any other model type, such as the
    /// SentencePiece `llama`, is an [`EngineError::Tokenizer`] naming it.
    ///
    /// The pre-tokenizer follows `tokenizer.ggml.pre`:
    /// - `smollm`, or no `pre` key: individual digits, then GPT-2 byte-level
    ///   splitting without a prefix space;
    /// - `llama-bpe`, `llama3`, `falcon3`: the Llama-3 split regex (with
    ///   `ignore_merges`, as Llama 3's `tokenizer.json` sets), then byte-level;
    /// - `qwen2`, `deepseek-r1-qwen`: the Qwen2 split regex, then byte-level;
    /// - anything else: GPT-2 byte-level splitting without a prefix space.
    ///
    /// Control tokens (`token_type` 3) become special tokens; user-defined
    /// tokens (`token_type` 4) become added tokens that are matched whole in
    /// text but decoded as ordinary text, as llama.cpp does.
    /// Generation ends at `eos_token_id`, `eot_token_id` and `eom_token_id`.
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self> {
        let model = gguf_str(metadata, "tokenizer.ggml.model")?.ok_or_else(|| tok_error("GGUF has no `tokenizer.ggml.model`"))?;
        if model != "gpt2" {
            return Err(tok_error(format!(
                "GGUF tokenizer model `{model}` is not supported: only `gpt2` (byte-level BPE) is; \
                 `llama` is a SentencePiece tokenizer"
            )));
        }
        let tokens = gguf_strings(metadata, "tokenizer.ggml.tokens")?.ok_or_else(|| tok_error("GGUF has no `tokenizer.ggml.tokens`"))?;
        let merges = gguf_strings(metadata, "tokenizer.ggml.merges")?.ok_or_else(|| tok_error("GGUF has no `tokenizer.ggml.merges`"))?;
        let token_types = gguf_ints(metadata, "tokenizer.ggml.token_type")?;

        let mut vocab = Vocab::default();
        for (id, token) in tokens.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| tok_error("GGUF vocabulary has over 2^32 tokens"))?;
            // A few GGUFs repeat a token string; the first id keeps it.
            vocab.entry((*token).to_owned()).or_insert(id);
        }
        let merges = merges
            .iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| tok_error(format!("GGUF merge `{merge}` is not two tokens separated by a space")))
            })
            .collect::<Result<Vec<_>>>()?;

        let pre = gguf_str(metadata, "tokenizer.ggml.pre")?;
        let (pre_tokenizer, ignore_merges) = gguf_pre_tokenizer(pre)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| tok_error(format!("building BPE from GGUF: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, true, true))));

        if let Some(types) = &token_types {
            if types.len() != tokens.len() {
                return Err(tok_error(format!("GGUF has {} token types for {} tokens", types.len(), tokens.len())));
            }
            let mut special = Vec::new();
            let mut user_defined = Vec::new();
            for (token, &ty) in tokens.iter().zip(types) {
                match ty {
                    TOKEN_TYPE_CONTROL => special.push(AddedToken::from((*token).to_owned(), true)),
                    TOKEN_TYPE_USER_DEFINED => user_defined.push(AddedToken::from((*token).to_owned(), false)),
                    _ => {}
                }
            }
            inner.add_special_tokens(special).map_err(|e| tok_error(format!("adding GGUF control tokens: {e}")))?;
            inner.add_tokens(user_defined).map_err(|e| tok_error(format!("adding GGUF user-defined tokens: {e}")))?;
        }

        let token_at = |key: &str| -> Result<Option<(u32, String)>> {
            let Some(id) = gguf_u32(metadata, key)? else {
                return Ok(None);
            };
            let text = usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .ok_or_else(|| tok_error(format!("GGUF `{key}` = {id} is outside the {}-token vocabulary", tokens.len())))?;
            Ok(Some((id, (*text).to_owned())))
        };
        let bos = token_at("tokenizer.ggml.bos_token_id")?;
        let eos = token_at("tokenizer.ggml.eos_token_id")?;
        let mut extra_eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some((id, _)) = token_at(key)? {
                extra_eos_ids.push(id);
            }
        }
        let facts = SpecialFacts {
            bos: bos.map(|(_, text)| text),
            eos: eos.map(|(_, text)| text),
            add_bos: gguf_bool(metadata, "tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            extra_eos_ids,
            chat_template: gguf_str(metadata, "tokenizer.chat_template")?.map(str::to_owned),
            spelling: PieceSpelling::ByteLevel,
        };
        Self::assemble(inner, facts)
    }

    /// Builds the tokenizer from a Hugging Face folder.
    ///
    /// - `tokenizer.json` is required.
    /// - `tokenizer_config.json` (optional) gives `bos_token` and `eos_token`
    ///   (strings or `{"content": ..}` objects), `add_bos_token`, and
    ///   `chat_template` (a string, or a list of `{name, template}` whose
    ///   `default` entry is used).
    /// - `chat_template.jinja` (optional) is the template when the config has
    ///   none, as newer `transformers` versions save it.
    /// - `generation_config.json` (optional) adds its `eos_token_id` (a number
    ///   or a list) to the ids that end generation.
    ///
    /// Without `add_bos_token`, BOS is added when `tokenizer.json`'s
    /// post-processor adds it.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tokenizer_path).map_err(|e| EngineError::io(&tokenizer_path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| EngineError::model(&tokenizer_path, format!("invalid tokenizer.json: {e}")))?;
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let generation = read_json_if_present(&dir.join("generation_config.json"))?;
        let config_field = |key: &str| config.as_ref().and_then(|c| c.get(key));

        let mut extra_eos_ids = Vec::new();
        match generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            Some(serde_json::Value::Array(ids)) => extra_eos_ids.extend(ids.iter().filter_map(json_u32)),
            Some(id) => extra_eos_ids.extend(json_u32(id)),
            None => {}
        }
        let bos = config_field("bos_token").and_then(json_token_text);
        let eos =
            config_field("eos_token").and_then(json_token_text).or_else(|| extra_eos_ids.first().and_then(|&id| inner.id_to_token(id)));
        let add_bos = match config_field("add_bos_token").and_then(serde_json::Value::as_bool) {
            Some(add) => add,
            None => {
                let bos_id = bos.as_deref().and_then(|b| inner.token_to_id(b));
                let with_special = inner.encode_fast("", true).map_err(|e| tok_error(format!("probing the post-processor: {e}")))?;
                bos_id.is_some() && with_special.get_ids().first().copied() == bos_id
            }
        };
        let mut chat_template = match config_field("chat_template") {
            Some(serde_json::Value::String(source)) => Some(source.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        if chat_template.is_none() {
            let jinja_path = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&jinja_path) {
                Ok(source) => chat_template = Some(source),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io(&jinja_path, e)),
            }
        }
        let spelling = match inner.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => PieceSpelling::ByteLevel,
            _ => PieceSpelling::SentencePiece,
        };
        let facts = SpecialFacts { bos, eos, add_bos, extra_eos_ids, chat_template, spelling };
        Self::assemble(inner, facts)
    }

    /// Resolves token texts to ids and collects the added and special ids.
    fn assemble(inner: tokenizers::Tokenizer, facts: SpecialFacts) -> Result<Self> {
        let bos = match facts.bos {
            Some(text) => {
                let id = inner.token_to_id(&text).ok_or_else(|| tok_error(format!("BOS token `{text}` is not in the vocabulary")))?;
                Some((id, text))
            }
            None => None,
        };
        let mut eos_ids = Vec::new();
        if let Some(text) = &facts.eos {
            let id = inner.token_to_id(text).ok_or_else(|| tok_error(format!("EOS token `{text}` is not in the vocabulary")))?;
            eos_ids.push(id);
        }
        for id in facts.extra_eos_ids {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let added = inner.get_added_tokens_decoder();
        let special_ids = added.iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        let added_ids = added.keys().copied().collect();
        Ok(Self {
            inner,
            bos,
            eos: facts.eos,
            eos_ids,
            add_bos: facts.add_bos,
            added_ids,
            special_ids,
            spelling: facts.spelling,
            chat_template: facts.chat_template,
        })
    }

    /// Encodes text. Special tokens written in the text (`<|im_start|>`) are
    /// recognised as special tokens.
    ///
    /// With `add_special`, BOS is prepended when the model wants it
    /// (`add_bos_token`), unless the text already starts with BOS (a chat
    /// template that writes `{{ bos_token }}`), so BOS is never doubled.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| tok_error(format!("encoding: {e}")))?;
        let ids = encoding.get_ids();
        match &self.bos {
            Some((bos_id, _)) if add_special && self.add_bos && ids.first() != Some(bos_id) => {
                let mut with_bos = Vec::with_capacity(ids.len() + 1);
                with_bos.push(*bos_id);
                with_bos.extend_from_slice(ids);
                Ok(with_bos)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes ids; `skip_special` drops special tokens. Ids outside the
    /// vocabulary are skipped; bytes that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| tok_error(format!("decoding: {e}")))
    }

    /// The token's text as the user would see it (`" world"`), for logprobs.
    /// Special and added tokens give their content; a piece that is part of a
    /// UTF-8 character gives U+FFFD; an id outside the vocabulary gives `""`.
    pub fn token_text(&self, id: u32) -> String {
        if self.added_ids.contains(&id) {
            return self.inner.id_to_token(id).unwrap_or_default();
        }
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    /// The raw bytes a token stands for (OpenAI logprobs `bytes`); empty for
    /// an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.added_ids.contains(&id) {
            return piece.into_bytes();
        }
        match self.spelling {
            PieceSpelling::ByteLevel => byte_level_piece_bytes(&piece),
            PieceSpelling::SentencePiece => sentencepiece_piece_bytes(&piece),
        }
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(id, _)| *id)
    }

    /// The BOS text (for chat templates), if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(_, text)| text.as_str())
    }

    /// The EOS text (for chat templates), if the model has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// Every id that ends generation: EOS first, then the GGUF
    /// `eot_token_id`/`eom_token_id` or the `generation_config.json` list.
    /// Never empty when the model has an EOS.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` is a special token (dropped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The model's Jinja chat template, if it ships one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped Hugging Face tokenizer (to save it as `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenization (the vLLM/TGI prefix/read offset algorithm).
///
/// Push generated ids one at a time and get back the text that is complete:
/// a chunk never ends in a partial UTF-8 character (U+FFFD), and special
/// tokens are skipped. Each step decodes only the window from
/// `prefix_offset`, so it costs O(window), not O(sequence).
#[derive(Debug, Clone)]
pub struct DecodeStream {
    /// All ids seen, the seeded prompt tail first.
    ids: Vec<u32>,
    /// Start of the window whose text has already been returned; decoding
    /// from here keeps context-dependent spacing right.
    prefix_offset: usize,
    /// End of the ids whose text has been returned; ids past it are held back.
    read_offset: usize,
    /// Whether special tokens are left out of the text.
    skip_special: bool,
}

impl Default for DecodeStream {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl DecodeStream {
    /// A stream seeded with the last few prompt ids (may be empty); their
    /// text is context, never returned.
    pub fn new(prompt_tail: &[u32]) -> Self {
        Self { ids: prompt_tail.to_vec(), prefix_offset: 0, read_offset: prompt_tail.len(), skip_special: true }
    }

    /// Keeps special tokens in the text (`skip_special_tokens: false`).
    pub fn keep_special(mut self) -> Self {
        self.skip_special = false;
        self
    }

    /// Adds one generated id and returns the newly completed text, which may
    /// be `""` while a UTF-8 character is incomplete or the id is special.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix_text, new_text) = self.window_texts(tok)?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            let out = text_after(&new_text, &prefix_text);
            self.advance();
            Ok(out)
        } else {
            Ok(String::new())
        }
    }

    /// Returns whatever is held back (an incomplete character comes out as
    /// U+FFFD) and marks everything as read.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = self.window_texts(tok)?;
        let out = text_after(&new_text, &prefix_text);
        self.advance();
        Ok(out)
    }

    /// Texts of `ids[prefix_offset..read_offset]` and `ids[prefix_offset..]`.
    fn window_texts(&self, tok: &Tokenizer) -> Result<(String, String)> {
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        Ok((prefix_text, new_text))
    }

    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
    }
}

/// `new_text` without its leading `prefix_text`. When decoding the longer
/// window changed earlier characters (it should not), returns what follows
/// their common prefix.
fn text_after(new_text: &str, prefix_text: &str) -> String {
    if let Some(rest) = new_text.strip_prefix(prefix_text) {
        return rest.to_owned();
    }
    let common = new_text
        .char_indices()
        .zip(prefix_text.chars())
        .find(|((_, a), b)| a != b)
        .map_or_else(|| new_text.len().min(prefix_text.len()), |((i, _), _)| i);
    new_text.get(common..).unwrap_or_default().to_owned()
}

/// The byte a GPT-2 byte-level character stands for: printable bytes are
/// themselves, the other 68 bytes (0x00–0x20, 0x7F–0xA0, 0xAD) are U+0100
/// onwards in byte order.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => u8::try_from(cp).ok(),
        0x100..=0x120 => u8::try_from(cp - 0x100).ok(),
        0x121..=0x142 => u8::try_from(cp - 0x121 + 0x7F).ok(),
        0x143 => Some(0xAD),
        _ => None,
    }
}

/// The bytes of a byte-level piece; a piece with a character outside the
/// byte alphabet is taken as raw text, as the `ByteLevel` decoder does.
fn byte_level_piece_bytes(piece: &str) -> Vec<u8> {
    piece.chars().map(byte_level_char_to_byte).collect::<Option<Vec<u8>>>().unwrap_or_else(|| piece.as_bytes().to_vec())
}

/// The bytes of a SentencePiece piece: `<0x0A>` is one raw byte, `▁` a space.
fn sentencepiece_piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if hex.len() == 2 {
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                return vec![byte];
            }
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre`, and whether BPE
/// should take whole words found in the vocabulary before merging.
fn gguf_pre_tokenizer(pre: Option<&str>) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level_after_split = || PreTokenizerWrapper::from(ByteLevel::new(false, true, false));
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| tok_error(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::from(split))
    };
    Ok(match pre {
        None | Some("smollm") => (Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(), false),
        Some("llama-bpe" | "llama3" | "falcon3") => (Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level_after_split()]).into(), true),
        Some("qwen2" | "deepseek-r1-qwen") => (Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level_after_split()]).into(), false),
        Some(other) => {
            tracing::warn!(pre = other, "unknown GGUF pre-tokenizer; using GPT-2 byte-level splitting");
            (ByteLevel::new(false, true, true).into(), false)
        }
    })
}

fn tok_error(message: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(message.into())
}

fn wrong_type(key: &str, value: &Value, expected: &str) -> EngineError {
    tok_error(format!("GGUF `{key}` is {:?}, expected {expected}", value.value_type()))
}

fn gguf_str<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(wrong_type(key, other, "a string")),
    }
}

fn gguf_bool(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(key, other, "a bool")),
    }
}

/// Any GGUF integer type as i64 (token ids and types come as u32 or i32).
fn value_as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::U8(v) => Some(i64::from(*v)),
        Value::I8(v) => Some(i64::from(*v)),
        Value::U16(v) => Some(i64::from(*v)),
        Value::I16(v) => Some(i64::from(*v)),
        Value::U32(v) => Some(i64::from(*v)),
        Value::I32(v) => Some(i64::from(*v)),
        Value::U64(v) => i64::try_from(*v).ok(),
        Value::I64(v) => Some(*v),
        _ => None,
    }
}

fn gguf_u32(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    value_as_i64(value).and_then(|v| u32::try_from(v).ok()).map(Some).ok_or_else(|| wrong_type(key, value, "a token id"))
}

fn gguf_array<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a [Value]>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items.as_slice())),
        Some(other) => Err(wrong_type(key, other, "an array")),
    }
}

fn gguf_strings<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(items) = gguf_array(metadata, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.as_str()),
            other => Err(wrong_type(key, other, "an array of strings")),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn gguf_ints(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(items) = gguf_array(metadata, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|item| value_as_i64(item).ok_or_else(|| wrong_type(key, item, "an array of integers")))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Reads a JSON file, or `None` when it does not exist.
fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EngineError::io(path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| EngineError::model(path, format!("invalid JSON: {e}")))
}

/// A token in `tokenizer_config.json`: a string or `{"content": ..}`.
fn json_token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(serde_json::Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn json_u32(value: &serde_json::Value) -> Option<u32> {
    value.as_u64().and_then(|v| u32::try_from(v).ok())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use std::sync::OnceLock;

    const MODEL_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");

    /// The real model's GGUF metadata; fails (never skips) without the file.
    pub(crate) fn smollm_metadata() -> HashMap<String, Value> {
        let mut file = std::fs::File::open(MODEL_PATH)
            .unwrap_or_else(|e| panic!("{MODEL_PATH}: {e}; run scripts/fetch-model.sh to download the test model"));
        Content::read(&mut file).expect("GGUF header").metadata
    }

    /// The real model's tokenizer, built once per test binary.
    pub(crate) fn smollm() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| Tokenizer::from_gguf(&smollm_metadata()).expect("SmolLM2 tokenizer"))
    }

    const ROUND_TRIP_TEXTS: &[&str] = &[
        "The quick brown fox jumps over the lazy dog.",
        "12345 3.14 and 1,000,000 or 007",
        "tabs\tand\nnewlines\r\n\n\nend\n",
        "double  spaces   and    more,  leading and trailing  ",
        " leading space",
        "Accents: café, naïve, Ångström, Ærø, señor, Łódź",
        "CJK: 你好，世界。日本語のテキスト。한국어 문장.",
        "Emoji: 🤗🚀 👨‍👩‍👧 ✅ and flags 🇫🇷",
        "fn main() {\n    let x = vec![1, 2, 3];\n\tif x.len() > 2 {\n        println!(\"{x:?}\");\n    }\n}\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>text right after a special token<|im_end|>",
    ];

    #[test]
    fn real_text_round_trips_exactly() {
        let tok = smollm();
        for text in ROUND_TRIP_TEXTS {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), *text, "ids {ids:?}");
        }
    }

    #[test]
    fn known_strings_encode_to_the_reference_ids() {
        let tok = smollm();
        assert_eq!(tok.encode("Hello, world!", false).unwrap(), [19556, 28, 905, 17]);
        assert_eq!(tok.encode("<|im_start|>assistant\n", false).unwrap(), [1, 520, 9531, 198]);
    }

    #[test]
    fn special_token_facts_match_the_gguf() {
        let tok = smollm();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert!(tok.eos_token_ids().contains(&2), "{:?}", tok.eos_token_ids());
        assert_eq!(tok.eos_token_ids()[0], 2);
        assert!(tok.is_special(1));
        assert!(tok.is_special(2));
        assert!(!tok.is_special(19556));
        let template = tok.chat_template_source().expect("SmolLM2 ships a chat template");
        assert!(template.contains("<|im_start|>"), "{template}");
    }

    #[test]
    fn special_tokens_are_dropped_only_with_skip_special() {
        let tok = smollm();
        let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nHi<|im_end|>");
    }

    #[test]
    fn add_special_prepends_bos_only_when_the_model_asks_and_never_twice() {
        let tok = smollm();
        // SmolLM2 sets add_bos_token = false.
        assert_eq!(tok.encode("Hello, world!", true).unwrap(), [19556, 28, 905, 17]);

        let mut metadata = smollm_metadata();
        metadata.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        let with_bos = Tokenizer::from_gguf(&metadata).unwrap();
        assert_eq!(with_bos.encode("Hello, world!", true).unwrap(), [1, 19556, 28, 905, 17]);
        assert_eq!(with_bos.encode("Hello, world!", false).unwrap(), [19556, 28, 905, 17]);
        let chat = with_bos.encode("<|im_start|>user", true).unwrap();
        assert_eq!(chat[0], 1);
        assert_ne!(chat[1], 1, "BOS doubled: {chat:?}");
    }

    #[test]
    fn gguf_eot_token_also_ends_generation() {
        let mut metadata = smollm_metadata();
        metadata.insert("tokenizer.ggml.eot_token_id".into(), Value::U32(0));
        let tok = Tokenizer::from_gguf(&metadata).unwrap();
        assert_eq!(tok.eos_token_ids(), [2, 0]);
    }

    #[test]
    fn sentencepiece_gguf_is_rejected_naming_the_model_type() {
        let mut metadata = smollm_metadata();
        metadata.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let err = Tokenizer::from_gguf(&metadata).unwrap_err();
        assert!(matches!(&err, EngineError::Tokenizer(m) if m.contains("`llama`")), "{err}");
    }

    #[test]
    fn user_defined_gguf_tokens_are_matched_whole_but_decoded_as_text() {
        let mut metadata = smollm_metadata();
        let Some(Value::Array(types)) = metadata.get_mut("tokenizer.ggml.token_type") else { panic!("SmolLM2 has token types") };
        // Pretend "Hello" (id 19556) is a user-defined token like Qwen's `<think>`.
        types[19556] = Value::I32(4);
        let tok = Tokenizer::from_gguf(&metadata).unwrap();
        assert!(!tok.is_special(19556));
        let ids = tok.encode("sayHello", false).unwrap();
        assert_eq!(ids.last(), Some(&19556), "{ids:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), "sayHello");
        assert_eq!(tok.token_text(19556), "Hello");
    }

    #[test]
    fn token_pieces_are_byte_level_decoded() {
        let tok = smollm();
        assert_eq!(tok.token_text(905), " world");
        assert_eq!(tok.token_bytes(905), b" world");
        assert_eq!(tok.token_text(198), "\n");
        assert_eq!(tok.token_text(1), "<|im_start|>");
        assert_eq!(tok.token_bytes(2), b"<|im_end|>");
        assert_eq!(tok.token_text(u32::MAX), "");
        assert!(tok.token_bytes(u32::MAX).is_empty());

        // The bytes of all pieces of a string are the string's bytes, even
        // when an emoji is split across byte tokens.
        for text in ROUND_TRIP_TEXTS {
            let ids = tok.encode(text, false).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
            assert_eq!(bytes, text.as_bytes());
        }
    }

    #[test]
    fn byte_level_alphabet_covers_all_256_bytes_once() {
        let mut seen = [false; 256];
        for cp in 0u32..0x200 {
            if let Some(b) = char::from_u32(cp).and_then(byte_level_char_to_byte) {
                assert!(!seen[usize::from(b)], "byte {b:#x} mapped twice");
                seen[usize::from(b)] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(byte_level_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_char_to_byte('Ċ'), Some(b'\n'));
    }

    #[test]
    fn sentencepiece_pieces_map_byte_tokens_and_spaces() {
        assert_eq!(sentencepiece_piece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_piece_bytes("<0xF0>"), [0xF0]);
        assert_eq!(sentencepiece_piece_bytes("▁world"), b" world");
        assert_eq!(sentencepiece_piece_bytes("<0xZZ>"), b"<0xZZ>");
    }

    #[test]
    fn decode_stream_concatenates_to_the_full_decode_without_replacement_chars() {
        let tok = smollm();
        let texts = [
            "Emoji 🤗 split 🚀🚀 and 👨‍👩‍👧 family",
            "CJK 你好世界，日本語のテキスト",
            "<|im_start|>assistant\nMixed 🇫🇷 café  spaces\t<|im_end|>",
        ];
        let mut held_back = false;
        for text in texts {
            let ids = tok.encode(text, false).unwrap();
            let mut stream = DecodeStream::new(&[]);
            let mut out = String::new();
            for &id in &ids {
                let chunk = stream.push(tok, id).unwrap();
                assert!(!chunk.contains('\u{FFFD}'), "chunk {chunk:?} of {text:?}");
                held_back |= chunk.is_empty() && !tok.is_special(id);
                out.push_str(&chunk);
            }
            out.push_str(&stream.finish(tok).unwrap());
            assert_eq!(out, tok.decode(&ids, true).unwrap());
        }
        assert!(held_back, "some emoji should span several byte tokens");
    }

    #[test]
    fn decode_stream_seeded_with_the_prompt_returns_only_new_text() {
        let tok = smollm();
        let prompt = tok.encode("Hello,", false).unwrap();
        let mut stream = DecodeStream::new(&prompt);
        let mut out = String::new();
        for id in tok.encode(" world!", false).unwrap() {
            out.push_str(&stream.push(tok, id).unwrap());
        }
        out.push_str(&stream.finish(tok).unwrap());
        assert_eq!(out, " world!");
    }

    #[test]
    fn decode_stream_finish_flushes_an_incomplete_character() {
        let tok = smollm();
        let ids = tok.encode("🤗", false).unwrap();
        assert!(ids.len() > 1, "{ids:?}");
        let mut stream = DecodeStream::new(&[]);
        assert_eq!(stream.push(tok, ids[0]).unwrap(), "");
        assert_eq!(stream.finish(tok).unwrap(), "\u{FFFD}");
        assert_eq!(stream.finish(tok).unwrap(), "");
    }

    #[test]
    fn llama3_and_qwen2_pre_tokenizers_split_digits_like_their_models() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let splits = |pre: &str, text: &str| -> Vec<String> {
            let (pre_tokenizer, _) = gguf_pre_tokenizer(Some(pre)).unwrap();
            let mut pretokenized = PreTokenizedString::from(text);
            pre_tokenizer.pre_tokenize(&mut pretokenized).unwrap();
            pretokenized.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(s, _, _)| s.to_owned()).collect()
        };
        assert_eq!(splits("llama-bpe", "x 12345 I'm"), ["x", "Ġ", "123", "45", "ĠI", "'m"]);
        assert_eq!(splits("qwen2", "x 123 I'm"), ["x", "Ġ", "1", "2", "3", "ĠI", "'m"]);
        assert_eq!(splits("smollm", "x 123"), ["x", "Ġ", "1", "2", "3"]);
        assert_eq!(splits("gpt-2", "x 123"), ["x", "Ġ123"]);
    }

    #[test]
    fn hf_folder_gives_the_same_encodings_and_eos() {
        let tok = smollm();
        let dir = std::env::temp_dir().join(format!("ouro-tokenizer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        tok.inner().save(dir.join("tokenizer.json"), false).unwrap();
        let config = serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "add_bos_token": false,
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": tok.chat_template_source().unwrap()},
            ],
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();

        let hf = Tokenizer::from_hf_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for text in ROUND_TRIP_TEXTS {
            assert_eq!(hf.encode(text, true).unwrap(), tok.encode(text, true).unwrap(), "{text:?}");
        }
        assert_eq!(hf.eos_token_ids(), [2, 0]);
        assert_eq!(hf.bos_token_id(), Some(1));
        assert_eq!(hf.eos_token(), Some("<|im_end|>"));
        assert_eq!(hf.vocab_size(), 49152);
        assert!(hf.is_special(1) && !hf.is_special(905));
        assert_eq!(hf.token_text(905), " world");
        assert_eq!(hf.chat_template_source(), tok.chat_template_source());
    }

    #[test]
    fn hf_folder_without_tokenizer_json_is_an_io_error() {
        let err = Tokenizer::from_hf_dir(Path::new("/nonexistent/ouro-model")).unwrap_err();
        assert!(matches!(err, EngineError::Io { .. }), "{err}");
    }
}
