//! HTTP routes, grouped by API.

pub mod admin;
pub mod console;
pub mod experience;
pub mod openai;
pub mod ops;
pub mod tokenizer;
