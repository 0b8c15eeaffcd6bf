//! HTTP routes, grouped by API.

pub mod openai;
pub mod ops;
pub mod tokenizer;
