//! Drawing: a pure function of the state, `render(&App, &mut Frame)`.
//! Nothing here changes the state or reads the clock; the same `App` draws
//! the same screen, which is what the snapshot tests rely on.

use std::time::Duration;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, Padding, Paragraph, Row, Table, TableState, Wrap,
};
use ratatui::Frame;

use super::app::{App, Cluster, Confirm, DisplayState, HubState, Mode, RowView, SPARK_WINDOW};
use super::theme::Theme;
use crate::daemon::control::{MemberState, TokenState};
use crate::daemon::fmt::humanize;

/// Width of the RTT sparkline (one cell per five seconds of the minute).
const SPARK_WIDTH: u16 = 12;
/// The countdown `retry in 12.3s (attempt 10)` fits in this.
const DETAIL_MIN: u16 = 27;
const HIGHLIGHT: &str = "> ";

pub fn render(app: &App, f: &mut Frame) {
    let theme = Theme::new(app.mono);
    let area = f.area();
    let detail_h = match area.height {
        h if h < 18 => 0,
        h => (h / 3).clamp(8, 16),
    };
    let [head, table, detail, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(detail_h),
        Constraint::Length(1),
    ])
    .areas(area);

    let rows = app.visible();
    let selected = app.selected_index(&rows);
    header(app, &rows, &theme, f, head);
    clusters(app, &rows, selected, &theme, f, table);
    if detail_h > 0 {
        if let Some(i) = selected {
            detail_pane(app, rows[i].0, &rows[i].1, &theme, f, detail);
        } else {
            let b = Block::default()
                .borders(Borders::ALL)
                .border_style(theme.border())
                .title(Span::styled(" details ", theme.title()));
            f.render_widget(
                Paragraph::new(Span::styled("no cluster selected", theme.dim())).block(b),
                detail,
            );
        }
    }
    footer(app, &theme, f, foot);

    match &app.mode {
        Mode::Help => help(&theme, f, area),
        Mode::Confirm(c) => confirm(c, &theme, f, area),
        Mode::Popup { title, body } => popup(title, body, &theme, f, area),
        Mode::Normal | Mode::Filter | Mode::PortForward { .. } => {}
    }
}

fn header(app: &App, rows: &[(&Cluster, RowView)], theme: &Theme, f: &mut Frame, area: Rect) {
    // Most important first: a narrow terminal cuts the end of the line.
    let mut spans = vec![Span::styled("towerctl ui", theme.title()), sep(theme)];
    let total = app.clusters.len();
    let count = |s: DisplayState| rows.iter().filter(|(_, v)| v.state == s).count();
    let mut counts = vec![format!(
        "{total} cluster{}",
        if total == 1 { "" } else { "s" }
    )];
    for s in [
        DisplayState::Connected,
        DisplayState::BackingOff,
        DisplayState::AuthFailed,
        DisplayState::Revoked,
    ] {
        let n = count(s);
        if n > 0 {
            counts.push(format!("{n} {}", s.label()));
        }
    }
    spans.push(Span::raw(counts.join(", ")));
    spans.push(sep(theme));
    let hub_detail = match &app.hub {
        HubState::Starting => {
            spans.push(Span::styled("hub …", theme.dim()));
            None
        }
        HubState::Absent => {
            spans.push(Span::styled("no hub on this machine", theme.dim()));
            None
        }
        HubState::Unreachable(e) => {
            spans.push(Span::styled(
                format!("hub unreachable, retrying ({e})"),
                theme.warn(),
            ));
            None
        }
        HubState::Up(h) => {
            spans.push(Span::raw(format!("hub up (pid {})", h.pid)));
            if h.refusing_operators.is_some() {
                // The reason is in `towerctl status` and the hub's log.
                spans.push(sep(theme));
                spans.push(Span::styled(
                    "REFUSING OPERATORS: registry unconfirmed (etcd)",
                    theme.warn(),
                ));
            }
            Some(format!(
                "tunnel {} · gateway {}",
                h.tunnel_addr, h.gateway_addr
            ))
        }
    };
    spans.push(sep(theme));
    spans.push(Span::styled("sort ", theme.dim()));
    spans.push(Span::raw(app.sort.label()));
    if !app.filter.is_empty() || app.mode == Mode::Filter {
        spans.push(sep(theme));
        spans.push(Span::styled("filter ", theme.dim()));
        spans.push(Span::raw(app.filter.clone()));
    }
    if let Some(d) = hub_detail {
        spans.push(sep(theme));
        spans.push(Span::styled(d, theme.dim()));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn sep(theme: &Theme) -> Span<'static> {
    Span::styled(" · ", theme.dim())
}

/// A table column: drawn in `order`, kept by `priority` (lower is dropped
/// first when the terminal is narrow).
struct Column {
    title: &'static str,
    width: u16,
    priority: u8,
    right: bool,
    /// The cell, given the column's width.
    cell: fn(&App, &Cluster, &RowView, &Theme, u16) -> Span<'static>,
}

fn dash() -> Span<'static> {
    Span::raw("-")
}

fn columns(name_width: u16) -> (Vec<Column>, u16) {
    let cols = vec![
        Column {
            title: "NAME",
            width: name_width,
            priority: 100,
            right: false,
            cell: |_, _, v, _, w| Span::raw(elide_middle(&v.name, w as usize)),
        },
        Column {
            title: "STATE",
            width: 15,
            priority: 99,
            right: false,
            cell: |_, _, v, t, _| Span::styled(v.state.label(), t.state(v.state)),
        },
        Column {
            title: "REMOTE",
            width: 21,
            priority: 40,
            right: false,
            cell: |_, _, v, _, _| v.remote.clone().map(Span::raw).unwrap_or_else(dash),
        },
        Column {
            title: "VERSION",
            width: 8,
            priority: 10,
            right: false,
            cell: |_, _, v, _, _| v.version.clone().map(Span::raw).unwrap_or_else(dash),
        },
        Column {
            title: "UPTIME",
            width: 6,
            priority: 80,
            right: true,
            cell: |_, _, v, _, _| {
                v.uptime
                    .map(|s| Span::raw(humanize(s)))
                    .unwrap_or_else(dash)
            },
        },
        Column {
            title: "RTT",
            width: 7,
            priority: 90,
            right: true,
            cell: |_, _, v, _, _| v.rtt_ms.map(|r| Span::raw(fmt_ms(r))).unwrap_or_else(dash),
        },
        Column {
            title: "RTT 1m",
            width: SPARK_WIDTH,
            priority: 70,
            right: false,
            cell: |app, c, _, t, _| {
                Span::styled(sparkline(app, c, SPARK_WIDTH as usize), t.spark())
            },
        },
        Column {
            title: "IN",
            width: 10,
            priority: 60,
            right: true,
            cell: |_, _, v, _, _| {
                v.rate_in
                    .map(|r| Span::raw(fmt_rate(r)))
                    .unwrap_or_else(dash)
            },
        },
        Column {
            title: "OUT",
            width: 10,
            priority: 59,
            right: true,
            cell: |_, _, v, _, _| {
                v.rate_out
                    .map(|r| Span::raw(fmt_rate(r)))
                    .unwrap_or_else(dash)
            },
        },
        Column {
            title: "STREAMS",
            width: 7,
            priority: 30,
            right: true,
            cell: |_, _, v, _, _| {
                v.streams
                    .map(|s| Span::raw(s.to_string()))
                    .unwrap_or_else(dash)
            },
        },
        Column {
            title: "RECONN",
            width: 6,
            priority: 20,
            right: true,
            cell: |_, _, v, _, _| {
                v.reconnects
                    .map(|s| Span::raw(s.to_string()))
                    .unwrap_or_else(dash)
            },
        },
    ];
    let total = cols.iter().map(|c| c.width + 1).sum();
    (cols, total)
}

/// The columns that fit in `width`, in display order, plus the width left
/// for DETAIL. Narrow terminals drop whole columns instead of wrapping.
fn fit(mut cols: Vec<Column>, width: u16) -> (Vec<Column>, u16) {
    let budget = width.saturating_sub(HIGHLIGHT.len() as u16);
    // NAME gives way to STATE on a very narrow terminal (a list of names
    // with no state said nothing): cut shorter, in its middle.
    let kept: u16 = cols
        .iter()
        .filter(|c| c.priority >= 99)
        .map(|c| c.width + 1)
        .sum();
    if kept > budget {
        if let Some(name) = cols.iter_mut().find(|c| c.title == "NAME") {
            name.width = name.width.saturating_sub(kept - budget).max(4);
        }
    }
    let mut by_priority: Vec<usize> = (0..cols.len()).collect();
    by_priority.sort_by_key(|&i| std::cmp::Reverse(cols[i].priority));
    let mut used = 0u16;
    let mut keep = vec![false; cols.len()];
    for i in by_priority {
        let w = cols[i].width + 1;
        // NAME and STATE always; the others only with room left for DETAIL.
        let need = if cols[i].priority >= 99 {
            0
        } else {
            DETAIL_MIN
        };
        if used + w + need <= budget {
            used += w;
            keep[i] = true;
        }
    }
    let kept: Vec<Column> = cols
        .into_iter()
        .zip(keep)
        .filter_map(|(c, k)| k.then_some(c))
        .collect();
    (kept, budget.saturating_sub(used))
}

fn clusters(
    app: &App,
    rows: &[(&Cluster, RowView)],
    selected: Option<usize>,
    theme: &Theme,
    f: &mut Frame,
    area: Rect,
) {
    if app.clusters.is_empty() {
        let text = match &app.hub {
            HubState::Up(_) => vec![
                Line::from("No clusters yet."),
                Line::from(""),
                Line::from(vec![
                    Span::raw("Register one with "),
                    Span::styled("towerctl cluster add NAME", theme.key()),
                    Span::raw(" and run the printed join command in the member."),
                ]),
            ],
            HubState::Starting => vec![Line::from("Asking the daemons on this machine…")],
            // An operator's machine: the members are the hub's to show.
            _ if !app.logins.is_empty() => {
                let mut lines = vec![
                    Line::from("This dashboard shows the hub and agents running on this machine: none runs here."),
                    Line::from(""),
                ];
                for l in &app.logins {
                    lines.push(Line::from(format!("Logged in to {l}.")));
                }
                lines.push(Line::from(""));
                lines.push(Line::from(vec![
                    Span::styled("towerctl use", theme.key()),
                    Span::raw(" lists the members you may reach and switches kubectl to one; "),
                    Span::styled("towerctl ui", theme.key()),
                    Span::raw(" on the hub's machine shows their tunnels."),
                ]));
                lines
            }
            _ => vec![
                Line::from("Nothing to show: no hub and no agent on this machine."),
                Line::from(""),
                Line::from(vec![
                    Span::raw("Start a hub with "),
                    Span::styled("towerctl up", theme.key()),
                    Span::raw(", or join this machine to one with "),
                    Span::styled("towerctl join", theme.key()),
                    Span::raw("."),
                ]),
            ],
        };
        f.render_widget(
            Paragraph::new(text).wrap(Wrap { trim: false }).block(
                Block::default()
                    .borders(Borders::TOP)
                    .border_style(theme.border()),
            ),
            area,
        );
        return;
    }
    if rows.is_empty() {
        f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::raw(format!("No cluster matches '{}'. ", app.filter)),
                Span::styled("Esc", theme.key()),
                Span::raw(" clears the filter."),
            ])),
            area,
        );
        return;
    }
    let name_width = rows
        .iter()
        .map(|(c, _)| c.name.chars().count() as u16)
        .max()
        .unwrap_or(4)
        // Wider on a wide terminal (names run to 63 characters); a longer
        // one is cut in its middle, where names that share a prefix and a
        // suffix are told apart least often.
        .clamp(4, (area.width * 2 / 5).clamp(24, 63));
    let (cols, _) = columns(name_width);
    let (cols, detail_w) = fit(cols, area.width);
    let mut widths: Vec<Constraint> = cols.iter().map(|c| Constraint::Length(c.width)).collect();
    let show_detail = detail_w > 0;
    if show_detail {
        widths.push(Constraint::Fill(1));
    }
    let align = |s: Span<'static>, c: &Column| -> Cell<'static> {
        if c.right {
            Cell::from(Line::from(s).right_aligned())
        } else {
            Cell::from(s)
        }
    };
    let mut head: Vec<Cell> = cols.iter().map(|c| align(Span::raw(c.title), c)).collect();
    if show_detail {
        head.push(Cell::from("DETAIL"));
    }
    let body: Vec<Row> = rows
        .iter()
        .map(|(c, v)| {
            let mut cells: Vec<Cell> = cols
                .iter()
                .map(|col| align((col.cell)(app, c, v, theme, col.width), col))
                .collect();
            if show_detail {
                let style = match v.state {
                    DisplayState::BackingOff => theme.warn(),
                    DisplayState::AuthFailed | DisplayState::Failed | DisplayState::Revoked => {
                        theme.state(v.state)
                    }
                    _ => theme.dim(),
                };
                cells.push(Cell::from(Span::styled(v.detail.clone(), style)));
            }
            Row::new(cells)
        })
        .collect();
    let table = Table::new(body, widths)
        .header(Row::new(head).style(theme.table_header()))
        .column_spacing(1)
        .row_highlight_style(theme.selected())
        .highlight_symbol(HIGHLIGHT)
        .highlight_spacing(ratatui::widgets::HighlightSpacing::Always);
    let mut state = TableState::default().with_selected(selected);
    f.render_stateful_widget(table, area, &mut state);
    // More members than rows: which of them are shown, at the header's
    // right end (the list scrolls with the selection and said nothing).
    let shown = usize::from(area.height.saturating_sub(1));
    if rows.len() > shown && shown > 0 {
        let first = state.offset().min(rows.len() - shown);
        let text = format!(" {}–{} of {} ", first + 1, first + shown, rows.len());
        let w = text.chars().count() as u16;
        if area.width >= w + name_width + 12 {
            f.render_widget(
                Paragraph::new(Span::styled(text, theme.dim())),
                Rect::new(area.x + area.width - w, area.y, w, 1),
            );
        }
    }
}

/// `s` in at most `width` characters: its start and end with `…` between.
fn elide_middle(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_string();
    }
    if width < 3 {
        return s.chars().take(width).collect();
    }
    let tail = (width - 1) / 2;
    let head = width - 1 - tail;
    let mut out: String = s.chars().take(head).collect();
    out.push('…');
    out.extend(s.chars().skip(n - tail));
    out
}

/// The last minute of RTT as block characters, one cell per `60/width`
/// seconds (the highest sample in it); blank where nothing was measured.
fn sparkline(app: &App, c: &Cluster, width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if c.rtt_1m.is_empty() {
        return String::new();
    }
    let bucket = SPARK_WINDOW.as_secs_f64() / width as f64;
    let mut cells: Vec<Option<f64>> = vec![None; width];
    for (t, v) in &c.rtt_1m {
        let age = app.now.saturating_duration_since(*t);
        if age > SPARK_WINDOW {
            continue;
        }
        // Newest on the right.
        let i = width - 1 - ((age.as_secs_f64() / bucket) as usize).min(width - 1);
        cells[i] = Some(cells[i].map_or(*v, |m: f64| m.max(*v)));
    }
    // Scaled between the lowest and highest of the minute, so a spike
    // stands out; a spread under 5% of the top is drawn flat (jitter of a
    // few microseconds is not news).
    let hi = cells.iter().flatten().copied().fold(f64::MIN, f64::max);
    let lo = cells.iter().flatten().copied().fold(f64::MAX, f64::min);
    cells
        .iter()
        .map(|c| match c {
            None => ' ',
            Some(_) if hi - lo <= hi * 0.05 => BARS[2],
            Some(v) => BARS[1 + (((v - lo) / (hi - lo)) * 6.0).round().clamp(0.0, 6.0) as usize],
        })
        .collect()
}

pub fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024.0 {
        return format!("{b:.0}B");
    }
    let mut v = b / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

pub fn fmt_rate(b: f64) -> String {
    format!("{}/s", fmt_bytes(b))
}

/// p-th percentile (nearest rank) of unsorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rtt_line(samples: &[f64], who: &str) -> String {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    format!(
        "p50 {}  p90 {}  p99 {}  max {}  ({} samples, {who})",
        fmt_ms(percentile(&s, 50.0)),
        fmt_ms(percentile(&s, 90.0)),
        fmt_ms(percentile(&s, 99.0)),
        fmt_ms(s[s.len() - 1]),
        s.len()
    )
}

fn detail_pane(app: &App, c: &Cluster, v: &RowView, theme: &Theme, f: &mut Frame, area: Rect) {
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border())
        .padding(Padding::horizontal(1))
        .title(Line::from(vec![
            Span::styled(
                format!(" {} ", crate::tunnel::printable(&c.name, 100)),
                theme.title(),
            ),
            Span::styled(format!("{} ", v.state.label()), theme.state(v.state)),
        ]));
    let label = |s: &'static str| Span::styled(format!("{s:<11}"), theme.label());
    let mut lines: Vec<Line> = Vec::new();

    let mut rtt = Vec::new();
    if let Some(h) = c.live_hub().filter(|h| !h.rtt_history_ms.is_empty()) {
        rtt.push(rtt_line(&h.rtt_history_ms, "hub"));
    }
    if let Some((a, _)) = c.live_agent().filter(|(a, _)| !a.rtt_history_ms.is_empty()) {
        rtt.push(rtt_line(&a.rtt_history_ms, "agent"));
    }
    if rtt.is_empty() {
        rtt.push("no samples yet".into());
    }
    for (i, r) in rtt.into_iter().enumerate() {
        lines.push(Line::from(vec![
            if i == 0 { label("rtt") } else { label("") },
            Span::raw(r),
        ]));
    }

    let traffic = match c.live_hub() {
        Some(h) if h.state == MemberState::Connected => format!(
            "in {}  out {}  · this session {} in, {} out · {} open stream{}",
            fmt_rate(v.rate_in.unwrap_or(0.0)),
            fmt_rate(v.rate_out.unwrap_or(0.0)),
            fmt_bytes(h.bytes_in as f64),
            fmt_bytes(h.bytes_out as f64),
            h.streams,
            if h.streams == 1 { "" } else { "s" }
        ),
        Some(_) => "no session".into(),
        None if c.hub.is_some() => "unknown: the hub does not answer".into(),
        None => "measured by the hub (not on this machine)".into(),
    };
    lines.push(Line::from(vec![label("traffic"), Span::raw(traffic)]));

    let mut tunnel = Vec::new();
    if let Some(h) = c.live_hub() {
        if let Some(r) = &h.remote {
            tunnel.push(format!("agent at {}", crate::tunnel::printable(r, 200)));
        }
    }
    if let Some((a, _)) = c.live_agent() {
        tunnel.push(format!(
            "local agent (pid {}) → {}",
            a.pid,
            crate::tunnel::printable(&a.hub, 200)
        ));
        tunnel.push(format!(
            "upstream {}",
            crate::tunnel::printable(&a.upstream, 200)
        ));
    }
    if let Some(r) = v.reconnects {
        tunnel.push(format!("{r} reconnect{}", if r == 1 { "" } else { "s" }));
    }
    if tunnel.is_empty() {
        tunnel.push("-".into());
    }
    lines.push(Line::from(vec![
        label("tunnel"),
        Span::raw(tunnel.join(" · ")),
    ]));
    let forwards: Vec<String> = app
        .forwards
        .iter()
        .filter(|b| b.cluster == c.name)
        .map(|b| {
            format!(
                "{} {}/{} {}",
                b.id,
                b.namespace,
                b.resource,
                b.forwarding.join(", ")
            )
        })
        .collect();
    let forwards = if forwards.is_empty() {
        "none".to_string()
    } else {
        forwards.join(" · ")
    };
    lines.push(Line::from(vec![label("forwards"), Span::raw(forwards)]));
    // The agent's key (what reconnects use) and the join token's state.
    let credential = match c.hub.as_ref().map(|h| &h.status) {
        Some(h) => {
            let key = h
                .key_fingerprint
                .as_deref()
                .map(|k| format!("agent key {k}"))
                .unwrap_or_else(|| "no agent key registered yet".into());
            let token = match (h.token_state, h.token_expires_at) {
                (TokenState::Unused, Some(t)) => format!(
                    "join token unused, expires in {}",
                    humanize(t.saturating_sub(app.now_unix))
                ),
                (TokenState::Unused, None) => "join token unused, no expiry".into(),
                (TokenState::Unknown, _) => "join token state unknown".into(),
                (s, _) => format!("join token {s}"),
            };
            format!("{key} · {token}")
        }
        None => "known to the hub only".into(),
    };
    lines.push(Line::from(vec![label("credential"), Span::raw(credential)]));
    if c.hub.as_ref().is_some_and(|h| h.status.impersonate) {
        lines.push(Line::from(vec![
            label("identity"),
            Span::raw("each operator acts as itself (impersonation)"),
        ]));
    }
    if let Some(h) = c.hub.as_ref().filter(|h| !h.status.labels.is_empty()) {
        // Registry text (checked when set through towerctl, not when
        // written to etcd by hand): no bidi override or zero-width
        // character reorders what the operator reads.
        let l = crate::tunnel::printable(&crate::daemon::labels::display(&h.status.labels), 500);
        lines.push(Line::from(vec![label("labels"), Span::raw(l)]));
    }

    let events = c.events();
    let inner_h = area.height.saturating_sub(2) as usize;
    let room = inner_h.saturating_sub(lines.len());
    if events.is_empty() && room > 0 {
        lines.push(Line::from(vec![
            label("events"),
            Span::styled("none yet", theme.dim()),
        ]));
    }
    for (i, (who, e)) in events.iter().take(room).enumerate() {
        let ago = format!("{:>4} ago ", humanize(app.now_unix.saturating_sub(e.at)));
        lines.push(Line::from(vec![
            if i == 0 { label("events") } else { label("") },
            Span::styled(ago, theme.dim()),
            Span::styled(format!("{who:<6}"), theme.dim()),
            Span::raw(e.text.clone()),
        ]));
    }
    f.render_widget(Paragraph::new(lines).block(block), area);
}

fn footer(app: &App, theme: &Theme, f: &mut Frame, area: Rect) {
    let line = if let Mode::PortForward { cluster, input } = &app.mode {
        Line::from(vec![
            Span::styled(format!("port-forward {cluster} "), theme.key()),
            Span::raw(input.clone()),
            Span::styled("▏", theme.key()),
            Span::styled(
                "   TYPE/NAME [LOCAL:]REMOTE [-n NS] · Enter start · Esc cancel",
                theme.dim(),
            ),
        ])
    } else if app.mode == Mode::Filter {
        Line::from(vec![
            Span::styled("filter: ", theme.key()),
            Span::raw(app.filter.clone()),
            Span::styled("▏", theme.key()),
            Span::styled("   Enter keep · Esc clear", theme.dim()),
        ])
    } else if let Some(m) = &app.message {
        Line::from(Span::styled(m.text.clone(), theme.message(m.level)))
    } else {
        let mut spans = Vec::new();
        // Help and quit first: a narrow terminal cuts the end.
        for (k, what) in [
            ("?", "help"),
            ("q", "quit"),
            ("↑↓", "select"),
            ("Enter", "use"),
            ("d", "disconnect"),
            ("r", "rotate token"),
            ("p", "port-forward"),
            ("/", "filter"),
            ("s", "sort"),
        ] {
            spans.push(Span::styled(k, theme.key()));
            spans.push(Span::styled(format!(" {what}  "), theme.dim()));
        }
        Line::from(spans)
    };
    f.render_widget(Paragraph::new(line), area);
}

/// A centred rectangle of at most `w`×`h` inside `area`.
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// A centred dialog at most `max_w` wide (and 4 less than the screen),
/// as tall as `lines` need once wrapped, plus borders.
fn fitted(area: Rect, max_w: u16, lines: &[Line]) -> Rect {
    let w = max_w.min(area.width.saturating_sub(4)).max(10);
    let inner = (w - 4) as usize; // borders and padding
    let h: usize = lines
        .iter()
        // Word wrapping wastes the end of lines: one spare line each.
        .map(|l| match l.width() {
            w if w <= inner => 1,
            w => w.div_ceil(inner) + 1,
        })
        .sum();
    centered(area, w, h as u16 + 2)
}

fn dialog<'a>(title: String, theme: &Theme) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .padding(Padding::horizontal(1))
        .border_style(theme.title())
        .title(Span::styled(format!(" {title} "), theme.title()))
}

fn help(theme: &Theme, f: &mut Frame, area: Rect) {
    let keys = [
        ("↑ ↓ j k", "select a cluster (PgUp PgDn Home End too)"),
        ("Enter", "switch kubectl to it (like 'towerctl use NAME')"),
        (
            "d",
            "disconnect its session (asks first; the agent reconnects)",
        ),
        (
            "r",
            "rotate its join token (asks first; shows the new command)",
        ),
        (
            "p",
            "port-forward to it in the background (svc/web 8080:80)",
        ),
        ("/", "filter by name or state; Esc clears"),
        ("s", "sort: name, state, rtt, traffic, reconnects"),
        ("?", "this help"),
        ("q Esc", "quit (Esc clears an active filter first)"),
    ];
    let mut lines: Vec<Line> = keys
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<9}"), theme.key()),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        "States: connected · connecting · backing off (with the agent's",
        theme.dim(),
    )));
    lines.push(Line::from(Span::styled(
        "countdown) · auth failed · revoked · disconnected · never connected",
        theme.dim(),
    )));
    lines.push(Line::from(Span::styled(
        "The hub's view of every member, merged with the agents on this machine.",
        theme.dim(),
    )));
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        "Any key closes this help.",
        theme.dim(),
    )));
    let r = fitted(area, 80, &lines);
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(dialog("Keys".into(), theme)),
        r,
    );
}

fn confirm(c: &Confirm, theme: &Theme, f: &mut Frame, area: Rect) {
    let (title, text) = match c {
        Confirm::Disconnect(n) => (
            format!("Disconnect '{n}'?"),
            format!("The hub cuts the live session of '{n}'. Its agent reconnects by itself, with backoff; requests in flight fail."),
        ),
        Confirm::Rotate(n) => (
            format!("Rotate the join token of '{n}'?"),
            format!("The hub issues a new join token for '{n}' and the old one stops working. The running agent keeps its session and reconnects with its own key; the new token is for a new or re-installed agent."),
        ),
    };
    let lines = vec![
        Line::from(text),
        Line::from(""),
        Line::from(vec![
            Span::styled("y", theme.key()),
            Span::raw(" yes   "),
            Span::styled("n Esc", theme.key()),
            Span::raw(" no"),
        ]),
    ];
    let r = fitted(area, 64, &lines);
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(dialog(title, theme)),
        r,
    );
}

/// A result to copy (a join command): the full width of the screen with
/// no side borders, so a mouse selection over several lines picks up the
/// command and nothing of the frame around it.
fn popup(title: &str, body: &str, theme: &Theme, f: &mut Frame, area: Rect) {
    let lines: Vec<Line> = body.lines().map(Line::from).collect();
    let w = area.width.max(1) as usize;
    let h: usize = lines
        .iter()
        .map(|l| match l.width() {
            n if n <= w => 1,
            // Word wrapping wastes the end of lines: one spare line.
            n => n.div_ceil(w) + 1,
        })
        .sum();
    let r = centered(area, area.width, h as u16 + 2);
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(Text::from(lines))
            .wrap(Wrap { trim: false })
            .block(
                Block::default()
                    .borders(Borders::TOP | Borders::BOTTOM)
                    .border_style(theme.title())
                    .title(Span::styled(format!(" {title} "), theme.title())),
            ),
        r,
    );
}

/// How long until the next redraw is worth doing: fast while a countdown
/// runs, once a second otherwise (uptimes and ages move by the second).
pub fn next_frame_in(app: &App) -> Duration {
    if app.animating() {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    }
}
