//! `towerctl ui`, the live dashboard.
//!
//! - [`app`]: the state (plain data, owned by the UI task) and
//!   `update(&mut App, Action)`, the only thing that changes it.
//! - [`render`]: `render(&App, &mut Frame)`, a pure function of the state.
//! - [`feed`]: subscriptions to the control sockets of the daemons on this
//!   machine; each snapshot becomes an [`Action`].
//! - [`run`]: the loop, generic over the ratatui `Backend`, so the whole UI
//!   runs in tests on `TestBackend`.
//! - [`term`]: the real terminal: raw mode, alternate screen, and a panic
//!   hook that always gives the terminal back.

pub mod app;
pub mod feed;
pub mod render;
pub mod term;
pub mod theme;

#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::backend::Backend;
use ratatui::Terminal;
use tokio::sync::mpsc;

pub use app::{Action, App, Effect};

/// At most this many frames a second: a burst of snapshots (a hundred
/// agents answering at once) becomes one redraw.
pub const MIN_FRAME: Duration = Duration::from_millis(100);

/// Carries out the side effects that `update` asks for. The result comes
/// back through `done` as [`Action::Done`], like any other news.
pub trait Effects {
    fn start(&self, effect: Effect, done: mpsc::Sender<Action>);
}

/// Runs the dashboard until the operator quits or `actions` closes.
///
/// Every input (keys, resizes, snapshots, effect results) arrives on
/// `actions`; `done` is handed to effects to report back on. `clock` gives
/// the current instant and Unix time, so tests can run the loop too.
pub async fn run<B, E, C>(
    terminal: &mut Terminal<B>,
    app: &mut App,
    mut actions: mpsc::Receiver<Action>,
    done: mpsc::Sender<Action>,
    effects: &E,
    mut clock: C,
) -> Result<()>
where
    B: Backend,
    B::Error: Send + Sync + 'static,
    E: Effects,
    C: FnMut() -> (Instant, u64),
{
    let (now, unix) = clock();
    app.now = now;
    app.now_unix = unix;
    let mut last_draw: Option<Instant> = None;
    let mut next_tick = now + render::next_frame_in(app);
    loop {
        let (now, unix) = clock();
        app.now = now;
        app.now_unix = unix;
        if now >= next_tick {
            app::update(app, Action::Tick);
            // Uptimes, ages and countdowns are derived from the clock.
            app.dirty = true;
            next_tick = now + render::next_frame_in(app);
        }
        if app.quit {
            return Ok(());
        }
        if app.dirty && last_draw.is_none_or(|t| now.saturating_duration_since(t) >= MIN_FRAME) {
            terminal.draw(|f| render::render(app, f))?;
            app.dirty = false;
            last_draw = Some(now);
        }
        let mut wake = next_tick;
        if app.dirty {
            if let Some(t) = last_draw {
                wake = wake.min(t + MIN_FRAME);
            }
        }
        let first = tokio::select! {
            a = actions.recv() => match a {
                Some(a) => Some(a),
                None => return Ok(()),
            },
            _ = tokio::time::sleep_until(wake.into()) => None,
        };
        // Take everything already queued before drawing again.
        let mut next = first;
        while let Some(a) = next {
            let (now, unix) = clock();
            app.now = now;
            app.now_unix = unix;
            for e in app::update(app, a) {
                effects.start(e, done.clone());
            }
            next = actions.try_recv().ok();
        }
        // A countdown that just appeared should start moving now, not at
        // the next one-second tick.
        next_tick = next_tick.min(app.now + render::next_frame_in(app));
    }
}
