//! The commands: what a user asks for, in terms of the executor and the readers below it.
//! `convert` (with `plan`, `--shard` tasks and `finalize`) chooses the pipeline and runs the
//! executor; `verify` re-reads a published dataset; `ingest` converts what an inbox adds;
//! `inspect` describes a source.

pub mod convert;
pub mod ingest;
pub mod inspect;
pub mod verify;
