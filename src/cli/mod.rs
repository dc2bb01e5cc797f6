//! The operator's commands besides `run`, `migrate` and `seed`: tools that
//! talk to a running worker through the broker. They belong to the binary: the
//! library is the worker.

pub mod dead_letters;
pub mod provision;
pub mod send;
