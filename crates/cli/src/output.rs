//! `-o table|yaml|json`.

use anyhow::Result;
use serde::Serialize;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Human-readable text.
    Table,
    Yaml,
    Json,
}

/// Prints data as yaml or json. For a list in yaml, one document per item.
pub fn print<T: Serialize>(format: Format, items: &[T]) -> Result<()> {
    match format {
        Format::Json => {
            if items.len() == 1 {
                println!("{}", serde_json::to_string_pretty(&items[0])?);
            } else {
                println!("{}", serde_json::to_string_pretty(items)?);
            }
        }
        Format::Yaml | Format::Table => {
            for item in items {
                print!("---\n{}", serde_yaml::to_string(item)?);
            }
        }
    }
    Ok(())
}
