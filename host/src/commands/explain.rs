//! `cloister explain CODE`.

use crate::errors::{UsageError, tables};

pub fn run(code: &str) -> anyhow::Result<()> {
    let info = cloister_proto::codes::lookup(&tables(), code)
        .ok_or_else(|| UsageError(format!("{code:?} is not a Cloister error code")))?;
    println!("{}: {}\n\n{}", info.code, info.summary, info.explanation);
    Ok(())
}
