//! Colours and emphasis. Only the 16 named ANSI colours, so the dashboard
//! looks the same in any terminal, over SSH and in tmux; with `NO_COLOR`
//! every style keeps its emphasis (bold, reverse) and drops its colour.

use ratatui::style::{Color, Modifier, Style};

use super::app::{DisplayState, Level};

#[derive(Debug, Clone, Copy)]
pub struct Theme {
    mono: bool,
}

impl Theme {
    pub fn new(mono: bool) -> Theme {
        Theme { mono }
    }

    /// `NO_COLOR` set to anything non-empty asks for no colour
    /// (<https://no-color.org>).
    pub fn mono_from_env() -> bool {
        std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
    }

    fn fg(&self, c: Color) -> Style {
        if self.mono {
            Style::new()
        } else {
            Style::new().fg(c)
        }
    }

    pub fn state(&self, s: DisplayState) -> Style {
        match s {
            DisplayState::Connected => self.fg(Color::Green),
            DisplayState::Connecting => self.fg(Color::Cyan),
            DisplayState::BackingOff => self.fg(Color::Yellow).add_modifier(Modifier::BOLD),
            DisplayState::AuthFailed | DisplayState::Revoked | DisplayState::Failed => {
                self.fg(Color::Red).add_modifier(Modifier::BOLD)
            }
            DisplayState::Disconnected | DisplayState::Stopped | DisplayState::Unknown => {
                self.fg(Color::Magenta)
            }
            DisplayState::NeverConnected => self.dim(),
        }
    }

    pub fn title(&self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }

    pub fn table_header(&self) -> Style {
        self.fg(Color::Blue).add_modifier(Modifier::BOLD)
    }

    pub fn selected(&self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }

    pub fn dim(&self) -> Style {
        self.fg(Color::DarkGray)
    }

    pub fn label(&self) -> Style {
        self.fg(Color::Blue)
    }

    pub fn key(&self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }

    pub fn spark(&self) -> Style {
        self.fg(Color::Cyan)
    }

    pub fn warn(&self) -> Style {
        self.fg(Color::Yellow).add_modifier(Modifier::BOLD)
    }

    pub fn message(&self, l: Level) -> Style {
        match l {
            Level::Info => self.fg(Color::Green).add_modifier(Modifier::BOLD),
            Level::Error => self.fg(Color::Red).add_modifier(Modifier::BOLD),
        }
    }

    pub fn border(&self) -> Style {
        self.fg(Color::DarkGray)
    }
}
