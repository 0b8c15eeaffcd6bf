//! Experience libraries (Training-Free GRPO): being written.
