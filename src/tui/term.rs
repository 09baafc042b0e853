//! The real terminal. Whatever happens (a normal quit, an error, a panic
//! on any thread, SIGTERM or SIGHUP when an SSH connection drops) the
//! terminal is given back: cooked mode, main screen, cursor visible.

use std::io::{IsTerminal, Stdout};

use anyhow::{bail, Context, Result};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::Terminal;

/// Restores the terminal when dropped.
pub struct Guard {
    _private: (),
}

impl Drop for Guard {
    fn drop(&mut self) {
        restore();
    }
}

/// Gives the terminal back. Safe to call more than once.
pub fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        terminal::LeaveAlternateScreen,
        cursor::Show
    );
}

/// Raw mode, alternate screen, hidden cursor, and a panic hook that
/// restores all of it before the panic message is printed. No mouse
/// capture: the operator can still select text (a join command) with the
/// mouse, in tmux and over SSH too.
pub fn enter() -> Result<(Terminal<CrosstermBackend<Stdout>>, Guard)> {
    if !std::io::stdout().is_terminal() {
        bail!("'towerctl ui' draws a full-screen dashboard and needs a terminal; for scripts use 'towerctl status -o json'");
    }
    if std::env::var_os("TERM").is_some_and(|t| t == "dumb") {
        bail!("'towerctl ui' draws a full-screen dashboard, which TERM=dumb cannot show: run it with TERM set for your terminal (xterm-256color, say), or use 'towerctl status'");
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
        // A panic in any task leaves the screen unusable (the terminal is
        // already back in cooked mode): stop instead of drawing over the
        // shell.
        std::process::exit(101);
    }));
    terminal::enable_raw_mode().context("cannot switch the terminal to raw mode")?;
    let guard = Guard { _private: () };
    execute!(
        std::io::stdout(),
        terminal::EnterAlternateScreen,
        cursor::Hide
    )
    .context("cannot switch to the alternate screen")?;
    let t = Terminal::new(CrosstermBackend::new(std::io::stdout()))
        .context("cannot set up the terminal")?;
    Ok((t, guard))
}
