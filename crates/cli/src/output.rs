//! `-o table|yaml|json`, and stdout that survives `| head`.

/// `print!` to stdout; a closed pipe ends the program quietly (exit 0), as `head` expects.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::output::write_stdout(&format!($($t)*))
    };
}

/// `println!` to stdout, like [`out!`].
macro_rules! outln {
    () => {
        $crate::output::write_stdout("\n")
    };
    ($($t:tt)*) => {
        $crate::output::write_stdout(&format!("{}\n", format_args!($($t)*)))
    };
}

pub fn write_stdout(s: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(s.as_bytes()).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(i32::from(crate::exit::OTHER));
    }
}

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
                outln!("{}", serde_json::to_string_pretty(&items[0])?);
            } else {
                outln!("{}", serde_json::to_string_pretty(items)?);
            }
        }
        Format::Yaml | Format::Table => {
            for item in items {
                out!("---\n{}", serde_yaml::to_string(item)?);
            }
        }
    }
    Ok(())
}
