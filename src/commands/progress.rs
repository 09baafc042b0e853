//! Spinners for waits (daemon start, dialing, handshake). Shown only on a
//! terminal: hidden when stderr is redirected, so scripts and CI logs stay
//! clean, and monochrome with NO_COLOR.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    /// A spinner with `msg`, or nothing when stderr is not a terminal or
    /// `quiet` (machine output requested).
    pub fn new(msg: impl Into<String>, quiet: bool) -> Spinner {
        if quiet || !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let colour = std::env::var_os("NO_COLOR").is_none();
        let template = if colour {
            "{spinner:.cyan} {msg} {elapsed:.dim}"
        } else {
            "{spinner} {msg} {elapsed}"
        };
        let pb = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style);
        }
        pb.set_message(msg.into());
        pb.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(pb))
    }

    pub fn set(&self, msg: impl Into<String>) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg.into());
        }
    }

    /// Removes the spinner line (results are printed by the caller).
    pub fn done(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.done();
    }
}
