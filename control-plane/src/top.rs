//! `remora top --proxy ADMIN_ADDR[,…]`: a terminal view of the busiest routes and endpoints of
//! one or more proxies, refreshed from their `/metrics` — requests per second, success rate,
//! p50/p99 (from the per-route histograms, over the last interval), the balancer's EWMA
//! latency and requests in flight. `q` (or Esc, or Ctrl-C) quits.
//!
//! Everything but drawing is a pure function of two scrapes ([`parse`], [`routes`],
//! [`endpoints`]), tested without a terminal.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// Proxies' admin addresses, comma-separated (REMORA_ADMIN_ADDR; 4191 in a pod).
    #[arg(long, value_delimiter = ',', required = true)]
    pub proxy: Vec<SocketAddr>,
    /// How often to refresh.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

/// One series: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    fn label(&self, k: &str) -> &str {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

/// Prometheus text exposition → series (comments, and lines that do not parse, skipped).
pub fn parse(text: &str) -> Vec<Series> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(l: &str) -> Option<Series> {
    let (name, rest) = match l.find('{') {
        Some(i) => (&l[..i], &l[i + 1..]),
        None => {
            let (n, v) = l.split_once(' ')?;
            return Some(Series {
                name: n.to_string(),
                labels: Vec::new(),
                value: v.split_whitespace().next()?.parse().ok()?,
            });
        }
    };
    parse_rest(name, Vec::new(), rest, 0)
}

/// Label pairs from `rest[off..]` up to the closing brace, then the value.
fn parse_rest(
    name: &str,
    mut labels: Vec<(String, String)>,
    rest: &str,
    mut off: usize,
) -> Option<Series> {
    loop {
        let r = &rest[off..];
        if let Some(after) = r.strip_prefix('}') {
            let value = after.split_whitespace().next()?.parse().ok()?;
            return Some(Series {
                name: name.to_string(),
                labels,
                value,
            });
        }
        let eq = r.find('=')?;
        let key = r[..eq].to_string();
        let mut value = String::new();
        let mut it = r[eq + 1..].char_indices();
        if it.next()?.1 != '"' {
            return None;
        }
        let mut close = None;
        while let Some((i, c)) = it.next() {
            match c {
                '\\' => match it.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => {
                    close = Some(eq + 1 + i);
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
        off += close? + 1;
        if rest[off..].starts_with(',') {
            off += 1;
        }
    }
}

/// A route of one proxy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteKey {
    pub proxy: String,
    pub direction: String,
    /// `Service/Method` for gRPC, `default` for other HTTP, `other` for the overflow set.
    pub route: String,
    pub peer: String,
}

/// An endpoint of one proxy's destination.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointKey {
    pub proxy: String,
    pub destination: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Default)]
struct RouteCounts {
    requests: f64,
    failures: f64,
    /// Cumulative buckets: upper bound, count.
    buckets: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, Default)]
struct EndpointCounts {
    requests: f64,
    failures: f64,
    ewma: f64,
    in_flight: f64,
}

/// What one round of scrapes saw.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    routes: HashMap<RouteKey, RouteCounts>,
    endpoints: HashMap<EndpointKey, EndpointCounts>,
}

impl Sample {
    /// Adds one proxy's series.
    pub fn add(&mut self, proxy: &str, series: &[Series]) {
        for s in series {
            let route = || RouteKey {
                proxy: proxy.to_string(),
                direction: s.label("direction").to_string(),
                route: match s.label("route") {
                    "grpc" => format!("{}/{}", s.label("grpc_service"), s.label("grpc_method")),
                    other => other.to_string(),
                },
                peer: s.label("peer_identity").to_string(),
            };
            let endpoint = || EndpointKey {
                proxy: proxy.to_string(),
                destination: s.label("destination").to_string(),
                endpoint: s.label("endpoint").to_string(),
            };
            match s.name.as_str() {
                "remora_route_requests_total" => {
                    self.routes.entry(route()).or_default().requests = s.value
                }
                "remora_route_failures_total" => {
                    self.routes.entry(route()).or_default().failures = s.value
                }
                "remora_route_request_duration_seconds_bucket" => {
                    let le = match s.label("le") {
                        "+Inf" => f64::INFINITY,
                        le => match le.parse() {
                            Ok(v) => v,
                            Err(_) => continue,
                        },
                    };
                    self.routes
                        .entry(route())
                        .or_default()
                        .buckets
                        .push((le, s.value));
                }
                "remora_endpoint_requests_total" => {
                    self.endpoints.entry(endpoint()).or_default().requests = s.value
                }
                "remora_endpoint_failures_total" => {
                    self.endpoints.entry(endpoint()).or_default().failures = s.value
                }
                "remora_endpoint_latency_ewma_seconds" => {
                    self.endpoints.entry(endpoint()).or_default().ewma = s.value
                }
                "remora_endpoint_requests_in_flight" => {
                    self.endpoints.entry(endpoint()).or_default().in_flight = s.value
                }
                _ => {}
            }
        }
    }
}

/// The `q` quantile of a cumulative histogram, interpolated inside its bucket as Prometheus'
/// `histogram_quantile` does; `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut b = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in b {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteRow {
    pub key: RouteKey,
    pub rps: f64,
    pub success: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EndpointRow {
    pub key: EndpointKey,
    pub rps: f64,
    pub success: Option<f64>,
    pub ewma: f64,
    pub in_flight: f64,
}

/// A counter's increase; a reset (the proxy restarted) counts from zero.
fn delta(now: f64, before: f64) -> f64 {
    if now >= before { now - before } else { now }
}

fn success(requests: f64, failures: f64) -> Option<f64> {
    (requests > 0.0).then(|| (1.0 - failures / requests).clamp(0.0, 1.0))
}

/// Routes over the interval `secs` between two samples, busiest first.
pub fn routes(prev: &Sample, cur: &Sample, secs: f64) -> Vec<RouteRow> {
    let mut rows: Vec<RouteRow> = cur
        .routes
        .iter()
        .map(|(k, c)| {
            let p = prev.routes.get(k).cloned().unwrap_or_default();
            let requests = delta(c.requests, p.requests);
            let failures = delta(c.failures, p.failures);
            let buckets: Vec<(f64, f64)> = c
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let before = p
                        .buckets
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map(|b| b.1)
                        .unwrap_or(0.0);
                    (le, delta(n, before))
                })
                .collect();
            RouteRow {
                key: k.clone(),
                rps: requests / secs.max(1e-3),
                success: success(requests, failures),
                p50: quantile(0.5, &buckets),
                p99: quantile(0.99, &buckets),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.rps.total_cmp(&a.rps).then_with(|| a.key.cmp(&b.key)));
    rows
}

/// Endpoints over the interval, busiest first.
pub fn endpoints(prev: &Sample, cur: &Sample, secs: f64) -> Vec<EndpointRow> {
    let mut rows: Vec<EndpointRow> = cur
        .endpoints
        .iter()
        .map(|(k, c)| {
            let p = prev.endpoints.get(k).cloned().unwrap_or_default();
            let requests = delta(c.requests, p.requests);
            EndpointRow {
                key: k.clone(),
                rps: requests / secs.max(1e-3),
                success: success(requests, delta(c.failures, p.failures)),
                ewma: c.ewma,
                in_flight: c.in_flight,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.rps.total_cmp(&a.rps).then_with(|| a.key.cmp(&b.key)));
    rows
}

/// `GET /metrics` from one proxy (plain HTTP/1.1, the whole body, bounded).
fn scrape(addr: SocketAddr) -> Result<String, String> {
    let timeout = Duration::from_secs(2);
    let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: remora-top\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tcp.take(16 * 1024 * 1024)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("not HTTP")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    // The admin server answers with Content-Length; a chunked body would need decoding.
    Ok(body.to_string())
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(s) if s < 1.0 => format!("{:.2}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
        None => "-".into(),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map(|s| format!("{:.1}%", s * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// A peer identity without its scheme, to fit the column.
fn short(id: &str) -> String {
    id.trim_start_matches("spiffe://").to_string()
}

struct View {
    routes: Vec<RouteRow>,
    endpoints: Vec<EndpointRow>,
    errors: Vec<String>,
    proxies: String,
    interval: Duration,
    frames: u64,
}

/// A bordered table: its columns (header and width) and title.
fn table<'a>(
    rows: impl IntoIterator<Item = Row<'a>>,
    columns: &[(&'a str, Constraint)],
    title: &'a str,
) -> Table<'a> {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    Table::new(rows, columns.iter().map(|c| c.1))
        .header(Row::new(columns.iter().map(|c| c.0)).style(bold))
        .block(Block::bordered().title(title))
}

fn draw(f: &mut ratatui::Frame<'_>, v: &View) {
    let [head, top, bottom, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Percentage(55),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(Line::from(format!(
            "remora top — {} — every {} — refresh {}",
            v.proxies,
            humantime::format_duration(v.interval),
            v.frames
        )))
        .style(Style::default().add_modifier(Modifier::BOLD)),
        head,
    );
    let route_rows = v.routes.iter().map(|r| {
        Row::new(vec![
            r.key.proxy.clone(),
            r.key.direction.clone(),
            r.key.route.clone(),
            short(&r.key.peer),
            format!("{:.1}", r.rps),
            pct(r.success),
            ms(r.p50),
            ms(r.p99),
        ])
    });
    f.render_widget(
        table(
            route_rows,
            &[
                ("PROXY", Constraint::Length(21)),
                ("DIR", Constraint::Length(8)),
                ("ROUTE", Constraint::Min(20)),
                ("PEER", Constraint::Min(16)),
                ("RPS", Constraint::Length(9)),
                ("SUCCESS", Constraint::Length(8)),
                ("P50", Constraint::Length(9)),
                ("P99", Constraint::Length(9)),
            ],
            " routes ",
        ),
        top,
    );
    let ep_rows = v.endpoints.iter().map(|e| {
        Row::new(vec![
            e.key.proxy.clone(),
            e.key.destination.clone(),
            e.key.endpoint.clone(),
            format!("{:.1}", e.rps),
            pct(e.success),
            ms(Some(e.ewma)),
            format!("{}", e.in_flight),
        ])
    });
    f.render_widget(
        table(
            ep_rows,
            &[
                ("PROXY", Constraint::Length(21)),
                ("DESTINATION", Constraint::Min(20)),
                ("ENDPOINT", Constraint::Length(22)),
                ("RPS", Constraint::Length(9)),
                ("SUCCESS", Constraint::Length(8)),
                ("EWMA", Constraint::Length(9)),
                ("IN FLIGHT", Constraint::Length(9)),
            ],
            " endpoints ",
        ),
        bottom,
    );
    let status = match v.errors.is_empty() {
        true => "q: quit".to_string(),
        false => format!("q: quit — {}", v.errors.join("; ")),
    };
    f.render_widget(Paragraph::new(status), foot);
}

fn collect(proxies: &[SocketAddr]) -> (Sample, Vec<String>) {
    let mut sample = Sample::default();
    let mut errors = Vec::new();
    for p in proxies {
        match scrape(*p) {
            Ok(text) => sample.add(&p.to_string(), &parse(&text)),
            Err(e) => errors.push(format!("{p}: {e}")),
        }
    }
    (sample, errors)
}

pub fn run(a: TopArgs) -> Result<(), String> {
    let interval = a.interval.max(Duration::from_millis(100));
    let (mut prev, _) = collect(&a.proxy);
    let mut prev_at = Instant::now();
    let mut terminal = ratatui::try_init().map_err(|e| format!("the terminal: {e}"))?;
    let mut view = View {
        routes: Vec::new(),
        endpoints: Vec::new(),
        errors: vec!["collecting…".into()],
        proxies: a
            .proxy
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(","),
        interval,
        frames: 0,
    };
    let result = (|| -> Result<(), String> {
        loop {
            terminal
                .draw(|f| draw(f, &view))
                .map_err(|e| format!("drawing: {e}"))?;
            let next = prev_at + interval;
            while let Some(wait) = next.checked_duration_since(Instant::now()) {
                if event::poll(wait).map_err(|e| e.to_string())?
                    && let Event::Key(k) = event::read().map_err(|e| e.to_string())?
                    && k.kind == KeyEventKind::Press
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                        || (k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL)))
                {
                    return Ok(());
                }
            }
            let (cur, errors) = collect(&a.proxy);
            let now = Instant::now();
            let secs = now.duration_since(prev_at).as_secs_f64();
            view.routes = routes(&prev, &cur, secs);
            view.endpoints = endpoints(&prev, &cur, secs);
            view.errors = errors;
            view.frames += 1;
            (prev, prev_at) = (cur, now);
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP remora_route_requests x
remora_route_requests_total{direction="inbound",peer_identity="spiffe://td/ns/a/sa/b",route="grpc",grpc_service="pkg.Svc",grpc_method="Get"} 100
remora_route_failures_total{direction="inbound",peer_identity="spiffe://td/ns/a/sa/b",route="grpc",grpc_service="pkg.Svc",grpc_method="Get"} 0
remora_route_request_duration_seconds_bucket{direction="inbound",peer_identity="spiffe://td/ns/a/sa/b",route="grpc",grpc_service="pkg.Svc",grpc_method="Get",le="0.001"} 50
remora_route_request_duration_seconds_bucket{direction="inbound",peer_identity="spiffe://td/ns/a/sa/b",route="grpc",grpc_service="pkg.Svc",grpc_method="Get",le="0.002"} 100
remora_route_request_duration_seconds_bucket{direction="inbound",peer_identity="spiffe://td/ns/a/sa/b",route="grpc",grpc_service="pkg.Svc",grpc_method="Get",le="+Inf"} 100
remora_endpoint_requests_total{destination="web:80",endpoint="10.0.0.1:80"} 10
remora_endpoint_latency_ewma_seconds{destination="web:80",endpoint="10.0.0.1:80"} 0.002
remora_endpoint_requests_in_flight{destination="web:80",endpoint="10.0.0.1:80"} 3
remora_uptime_seconds 12.5
"#;

    #[test]
    fn parses_the_exposition() {
        let s = parse(BEFORE);
        assert_eq!(s.len(), 9);
        assert_eq!(s[0].label("grpc_service"), "pkg.Svc");
        assert_eq!(s[0].value, 100.0);
        assert_eq!(s[4].label("le"), "+Inf");
        assert_eq!(s[8].name, "remora_uptime_seconds");
        let escaped = parse(r#"m{a="x\"y\\z",b=""} 1"#);
        assert_eq!(
            escaped[0].labels,
            [("a".into(), "x\"y\\z".into()), ("b".into(), "".into())]
        );
        assert!(parse("m{a=unquoted} 1").is_empty());
        assert!(parse("m{a=\"open} 1").is_empty());
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [(0.001, 50.0), (0.002, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &b), Some(0.001));
        assert!((quantile(0.75, &b).unwrap() - 0.0015).abs() < 1e-9);
        assert_eq!(quantile(0.5, &[(0.001, 0.0), (f64::INFINITY, 0.0)]), None);
        // Everything beyond the last bound: its lower edge, as Prometheus answers.
        assert_eq!(
            quantile(0.99, &[(0.001, 0.0), (f64::INFINITY, 4.0)]),
            Some(0.001)
        );
    }

    #[test]
    fn rates_success_and_latency_over_the_interval() {
        let after = BEFORE
            .replace("} 100\n", "} 300\n")
            .replace(r#"le="0.001"} 50"#, r#"le="0.001"} 250"#)
            .replace(r#"grpc_method="Get"} 0"#, r#"grpc_method="Get"} 20"#)
            .replace(
                r#"endpoint="10.0.0.1:80"} 10"#,
                r#"endpoint="10.0.0.1:80"} 30"#,
            );
        let (mut a, mut b) = (Sample::default(), Sample::default());
        a.add("p1", &parse(BEFORE));
        b.add("p1", &parse(&after));
        let r = routes(&a, &b, 2.0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].key.route, "pkg.Svc/Get");
        assert_eq!(r[0].rps, 100.0);
        assert!((r[0].success.unwrap() - 0.9).abs() < 1e-9);
        // The interval's 200 requests: 200 under 1 ms, so p50 and p99 are under it.
        assert!(r[0].p99.unwrap() <= 0.001);
        let e = endpoints(&a, &b, 2.0);
        assert_eq!(e[0].rps, 10.0);
        assert_eq!(e[0].in_flight, 3.0);
        // Nothing new: zero rps, no success rate, no latency.
        let idle = routes(&b, &b, 1.0);
        assert_eq!(
            (idle[0].rps, idle[0].success, idle[0].p50),
            (0.0, None, None)
        );
    }
}
