//! Diagnostics that point into a pipeline file.

use std::fmt;
use std::path::PathBuf;

use crate::yaml::Mark;

/// One problem in a pipeline file, with its location and, where possible, what to do.
#[derive(Debug, Clone)]
pub struct Diag {
    /// The pipeline file.
    pub file: PathBuf,
    /// Where in it (1-based line and column); line 0 means the whole file.
    pub mark: Mark,
    /// What is wrong.
    pub message: String,
    /// A suggestion.
    pub help: Option<String>,
    /// The source line at `mark`, for display.
    pub snippet: Option<String>,
}

/// A non-empty list of diagnostics, reported together.
#[derive(Debug, Clone)]
pub struct Diags(pub Vec<Diag>);

impl std::error::Error for Diags {}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        if self.mark.line == 0 {
            write!(f, "{file}: {}", self.message)?;
        } else {
            write!(
                f,
                "{file}:{}:{}: {}",
                self.mark.line, self.mark.col, self.message
            )?;
        }
        if let Some(line) = &self.snippet {
            let num = self.mark.line.to_string();
            let pad = " ".repeat(num.len());
            let caret = " ".repeat(self.mark.col.saturating_sub(1));
            write!(f, "\n{pad} |\n{num} | {line}\n{pad} | {caret}^")?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Diags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() > 1 {
            write!(f, "\n\n{} problems in the pipeline file", self.0.len())?;
        }
        Ok(())
    }
}

/// Collects diagnostics for one file.
pub struct Reporter<'a> {
    file: PathBuf,
    src: &'a str,
    /// Collected so far.
    pub diags: Vec<Diag>,
    /// An error was found but not reported (it follows from one that was).
    pub suppressed: bool,
}

impl<'a> Reporter<'a> {
    /// A reporter for `file` whose text is `src`.
    pub fn new(file: impl Into<PathBuf>, src: &'a str) -> Self {
        Reporter {
            file: file.into(),
            src,
            diags: Vec::new(),
            suppressed: false,
        }
    }

    /// Records a problem at `mark`.
    pub fn error(&mut self, mark: Mark, message: impl Into<String>, help: Option<String>) {
        self.error_at(mark, message, help, None);
    }

    /// Records a problem with the reference `${expr}` inside the value at `mark`,
    /// pointing at the reference itself when it is on that line.
    pub fn error_at(
        &mut self,
        mut mark: Mark,
        message: impl Into<String>,
        help: Option<String>,
        expr: Option<&str>,
    ) {
        let message = message.into();
        if let Some(expr) = expr
            && let Some(line) = self.src.lines().nth(mark.line.wrapping_sub(1))
        {
            let from = line
                .char_indices()
                .nth(mark.col.saturating_sub(1))
                .map(|(b, _)| b)
                .unwrap_or(0);
            if let Some(pos) = line[from..].find(&format!("${{{expr}")) {
                mark.col = line[..from + pos].chars().count() + 1;
            }
        }
        let snippet = (mark.line > 0)
            .then(|| self.src.lines().nth(mark.line - 1).map(str::to_owned))
            .flatten();
        self.diags.push(Diag {
            file: self.file.clone(),
            mark,
            message,
            help,
            snippet,
        });
    }

    /// Whether any problem was recorded.
    pub fn failed(&self) -> bool {
        !self.diags.is_empty() || self.suppressed
    }

    /// Ok when nothing was reported.
    pub fn finish(self) -> Result<(), Diags> {
        if self.diags.is_empty() {
            Ok(())
        } else {
            Err(Diags(self.diags))
        }
    }
}

/// The closest candidate to `word`, if close enough to be a likely typo.
pub fn suggest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// `did you mean 'x'?`, or a list of the valid choices.
pub fn did_you_mean(word: &str, candidates: &[&str]) -> Option<String> {
    if let Some(best) = suggest(word, candidates.iter().copied()) {
        Some(format!("did you mean '{best}'?"))
    } else if candidates.is_empty() {
        None
    } else {
        Some(format!("expected one of: {}", candidates.join(", ")))
    }
}
