//! Online speculator training (Aurora): being written.
