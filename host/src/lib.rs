//! The `cloister` CLI's library part: the data owner's envelope encryption
//! (`cloister encrypt`/`decrypt`). The binary (src/main.rs) holds the commands:
//! the owner's and the parent's, the broker and the supervisor daemons.

pub mod sealing;
