//! The Grafana dashboard (`deploy/grafana/remora.json`) against what proxies really expose: two
//! proxies over mTLS carry gRPC-looking HTTP/2, plain HTTP/1.1, plaintext inbound and requests
//! to a dead endpoint, then every metric a panel or variable queries must be in their
//! `/metrics`, with every label the query matches, groups by or prints in a legend. Renaming a
//! metric or a label in the proxy (or in the dashboard) fails this test.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use remora_tests::*;
use serde_json::Value;

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

/// Target labels Prometheus adds when it scrapes (`job`, `instance`, and `namespace`/`pod` from
/// Kubernetes service discovery relabelling): no proxy exposes them, a dashboard may use them.
const SCRAPE_LABELS: &[&str] = &["job", "instance", "namespace", "pod"];

/// Grafana's own variables, usable in any query.
const GRAFANA_VARIABLES: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__range",
    "__range_s",
    "__range_ms",
];

/// PromQL aggregation operators, after which `by (...)` / `without (...)` may come.
const AGGREGATORS: &[&str] = &[
    "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
];

/// Functions and keywords the dashboard may use; any other identifier outside a label list
/// would be a metric, and every metric must be a `remora_*` one.
const KEYWORDS: &[&str] = &[
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "time",
    "vector",
    "scalar",
    "abs",
    "clamp_min",
    "clamp_max",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "and",
    "or",
    "unless",
    "bool",
];

/// Row (group) title keywords, and metrics the panels under that row must show.
const GROUPS: &[(&str, &[&str])] = &[
    (
        "workload",
        &[
            "remora_requests_total",
            "remora_request_duration_seconds_bucket",
            "remora_route_failures_total",
        ],
    ),
    ("error", &["remora_errors_total", "remora_panics_total"]),
    (
        "route",
        &[
            "remora_route_requests_total",
            "remora_route_failures_total",
            "remora_route_request_duration_seconds_bucket",
            "remora_route_overflow_total",
        ],
    ),
    (
        "endpoint",
        &[
            "remora_endpoint_requests_total",
            "remora_endpoint_failures_total",
            "remora_endpoint_requests_in_flight",
            "remora_endpoint_latency_ewma_seconds",
            "remora_endpoint_ready",
        ],
    ),
    (
        "tls",
        &[
            "remora_identity_expiry_timestamp_seconds",
            "remora_identity_reload_failures_total",
            "remora_tls_connections_total",
        ],
    ),
    (
        "drain",
        &[
            "remora_draining",
            "remora_drain_start_connections",
            "remora_drain_start_requests",
            "remora_drain_cut_connections",
        ],
    ),
];

fn dashboard_text() -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/remora.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&dashboard_text()).expect("the dashboard is JSON")
}

// ------------------------------------------------------------------------------------------
// The scrape: sample names and the label names each carries.

#[derive(Default, Debug)]
struct Scrape {
    /// Sample name (`remora_requests_total`, `…_bucket`) → label names seen on it.
    series: BTreeMap<String, BTreeSet<String>>,
    /// Families declared by `# TYPE`, with or without samples.
    families: BTreeSet<String>,
}

impl Scrape {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let family = rest.split(' ').next().unwrap_or_default();
                self.families.insert(family.to_string());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = self.series.entry(line[..end].to_string()).or_default();
            if let Some(rest) = line[end..].strip_prefix('{') {
                labels.extend(label_names(rest).unwrap_or_else(|| panic!("sample line {line:?}")));
            }
        }
    }

    fn labels(&self, metric: &str) -> Option<&BTreeSet<String>> {
        self.series.get(metric)
    }

    /// Why `metric` is not in the scrape, for the failure message.
    fn missing(&self, metric: &str) -> String {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| metric.strip_suffix(s))
            .filter(|f| self.families.contains(*f))
            .unwrap_or(metric);
        if self.families.contains(family) {
            format!(
                "{metric}: family {family} is registered but has no samples (this test's traffic should produce one)"
            )
        } else {
            let close: Vec<&String> = self
                .series
                .keys()
                .filter(|k| {
                    let stem = |s: &str| s.trim_end_matches("_total").to_string();
                    stem(k).contains(&stem(metric)) || stem(metric).contains(&stem(k))
                })
                .collect();
            format!("{metric} is not exposed by the proxy (renamed?); similar names: {close:?}")
        }
    }
}

/// Label names of `a="x",b="y\"z"}` (after the `{`); `None` when malformed.
fn label_names(s: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || *c == ' ').is_some() {}
        if chars.next_if_eq(&'}').is_some() {
            return Some(names);
        }
        let mut name = String::new();
        loop {
            match chars.next()? {
                '=' => break,
                c => name.push(c),
            }
        }
        if chars.next()? != '"' || name.is_empty() {
            return None;
        }
        loop {
            match chars.next()? {
                '\\' => {
                    chars.next()?;
                }
                '"' => break,
                _ => {}
            }
        }
        names.push(name);
    }
}

// ------------------------------------------------------------------------------------------
// Enough of PromQL to find metric selectors, their label matchers and `by (...)` clauses.

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str,
    /// `$job`, `${datasource}`.
    Var,
    /// `[5m]`, `[$__rate_interval]`.
    Range,
    Num,
    Op(String),
    Open(char),
    Close(char),
    Comma,
}

/// Tokens, and for each bracket token the index of its partner.
fn lex(expr: &str) -> Result<(Vec<Tok>, Vec<usize>), String> {
    let c: Vec<char> = expr.chars().collect();
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let (mut toks, mut pair, mut stack) = (Vec::new(), Vec::new(), Vec::<usize>::new());
    let mut i = 0;
    while i < c.len() {
        let start = i;
        let tok = match c[i] {
            ch if ch.is_whitespace() => {
                i += 1;
                continue;
            }
            q @ ('"' | '\'' | '`') => {
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' && q != '`' { 2 } else { 1 };
                }
                if i >= c.len() {
                    return Err(format!("unterminated string in {expr:?}"));
                }
                i += 1;
                Tok::Str
            }
            '[' => {
                let len = c[i..]
                    .iter()
                    .position(|ch| *ch == ']')
                    .ok_or_else(|| format!("unterminated range in {expr:?}"))?;
                if len < 2 {
                    return Err(format!("empty range in {expr:?}"));
                }
                i += len + 1;
                Tok::Range
            }
            '$' => {
                i += 1;
                let name: String = if c.get(i) == Some(&'{') {
                    let len = c[i..]
                        .iter()
                        .position(|ch| *ch == '}')
                        .ok_or_else(|| format!("unterminated ${{…}} in {expr:?}"))?;
                    let inner: String = c[i + 1..i + len].iter().collect();
                    i += len + 1;
                    inner.split(':').next().unwrap_or_default().to_string()
                } else {
                    let len = c[i..].iter().take_while(|ch| ident(**ch)).count();
                    i += len;
                    c[i - len..i].iter().collect()
                };
                if name.is_empty() {
                    return Err(format!("a lone $ in {expr:?}"));
                }
                Tok::Var
            }
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                Tok::Ident(c[start..i].iter().collect())
            }
            ch if ch.is_ascii_digit() || ch == '.' => {
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                    i += 1;
                }
                Tok::Num
            }
            ch @ ('(' | '{') => {
                i += 1;
                stack.push(toks.len());
                Tok::Open(ch)
            }
            ch @ (')' | '}') => {
                i += 1;
                let open = stack
                    .pop()
                    .ok_or_else(|| format!("unbalanced {ch:?} in {expr:?}"))?;
                let want = if ch == ')' { '(' } else { '{' };
                if toks[open] != Tok::Open(want) {
                    return Err(format!("mismatched {ch:?} in {expr:?}"));
                }
                pair[open] = toks.len();
                pair.push(open);
                toks.push(Tok::Close(ch));
                continue;
            }
            ',' => {
                i += 1;
                Tok::Comma
            }
            _ => {
                let two: String = c[i..(i + 2).min(c.len())].iter().collect();
                let op = if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                    two
                } else if "=<>+-*/%^".contains(c[i]) {
                    c[i].to_string()
                } else {
                    return Err(format!("unexpected {:?} in {expr:?}", c[i]));
                };
                i += op.len();
                Tok::Op(op)
            }
        };
        pair.push(usize::MAX);
        toks.push(tok);
    }
    if let Some(open) = stack.pop() {
        return Err(format!("unclosed {:?} in {expr:?}", toks[open]));
    }
    Ok((toks, pair))
}

#[derive(Debug)]
struct Selector {
    metric: String,
    /// Label names matched in `{…}`.
    matchers: Vec<String>,
}

#[derive(Debug)]
struct Grouping {
    clause: String,
    labels: Vec<String>,
    /// The `remora_*` metrics the clause applies to.
    scope: Vec<String>,
}

#[derive(Debug, Default)]
struct Query {
    selectors: Vec<Selector>,
    groupings: Vec<Grouping>,
    variables: Vec<String>,
}

fn analyze(expr: &str) -> Result<Query, String> {
    let (toks, pair) = lex(expr)?;
    let metrics_in = |r: RangeInclusive<usize>| -> Vec<String> {
        toks[r]
            .iter()
            .filter_map(|t| match t {
                Tok::Ident(n) if n.starts_with("remora_") => Some(n.clone()),
                _ => None,
            })
            .collect()
    };
    // Idents and commas up to `close`: a label list.
    let label_list = |from: usize, close: usize| -> Result<Vec<String>, String> {
        let mut labels = Vec::new();
        for t in &toks[from..close] {
            match t {
                Tok::Ident(l) => labels.push(l.clone()),
                Tok::Comma => {}
                other => return Err(format!("{other:?} in a label list of {expr:?}")),
            }
        }
        Ok(labels)
    };
    let mut q = Query::default();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(name) if name.starts_with("remora_") => {
                let mut matchers = Vec::new();
                if toks.get(i + 1) == Some(&Tok::Open('{')) {
                    let end = pair[i + 1];
                    let mut j = i + 2;
                    while j < end {
                        let (Tok::Ident(label), Some(Tok::Op(op)), Some(Tok::Str)) =
                            (&toks[j], toks.get(j + 1), toks.get(j + 2))
                        else {
                            return Err(format!("bad label matcher in {expr:?}"));
                        };
                        if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                            return Err(format!("bad matcher operator {op} in {expr:?}"));
                        }
                        matchers.push(label.clone());
                        j += 3;
                        if toks.get(j) == Some(&Tok::Comma) {
                            j += 1;
                        }
                    }
                    i = end;
                }
                q.selectors.push(Selector {
                    metric: name.clone(),
                    matchers,
                });
            }
            Tok::Ident(kw)
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&kw.as_str()) =>
            {
                if toks.get(i + 1) != Some(&Tok::Open('(')) {
                    return Err(format!("{kw} without a label list in {expr:?}"));
                }
                let close = pair[i + 1];
                let labels = label_list(i + 2, close)?;
                let scope = match (kw.as_str(), i.checked_sub(1).map(|p| &toks[p])) {
                    ("by" | "without", Some(Tok::Ident(agg)))
                        if AGGREGATORS.contains(&agg.as_str()) =>
                    {
                        // `sum by (x) (expr)`
                        if toks.get(close + 1) != Some(&Tok::Open('(')) {
                            return Err(format!("{agg} {kw} (…) without an argument in {expr:?}"));
                        }
                        metrics_in(close + 1..=pair[close + 1])
                    }
                    // `sum (expr) by (x)`
                    ("by" | "without", Some(Tok::Close(')'))) => metrics_in(pair[i - 1]..=i - 1),
                    ("by" | "without", _) => {
                        return Err(format!("{kw} not after an aggregation in {expr:?}"));
                    }
                    // Vector matching: the labels must be on both sides.
                    _ => metrics_in(0..=toks.len() - 1),
                };
                if scope.is_empty() {
                    return Err(format!(
                        "{kw} ({labels:?}) over no remora metric in {expr:?}"
                    ));
                }
                q.groupings.push(Grouping {
                    clause: kw.clone(),
                    labels,
                    scope,
                });
                i = close;
            }
            Tok::Ident(other)
                if !KEYWORDS.contains(&other.as_str())
                    && !AGGREGATORS.contains(&other.as_str()) =>
            {
                return Err(format!(
                    "{other:?} in {expr:?} is neither a remora_* metric nor a known PromQL function"
                ));
            }
            Tok::Open('{') => {
                return Err(format!("a selector without a remora_* name in {expr:?}"));
            }
            _ => {}
        }
        i += 1;
    }
    q.variables = variables_in(expr);
    Ok(q)
}

/// `$name` and `${name}` / `${name:format}` references, inside strings too.
fn variables_in(expr: &str) -> Vec<String> {
    expr.split('$')
        .skip(1)
        .map(|s| match s.strip_prefix('{') {
            Some(braced) => braced.split([':', '}']).next().unwrap_or_default(),
            None => s
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default(),
        })
        .map(String::from)
        .collect()
}

/// `{{label}}` names in a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(l, _)| l.trim().to_string())
        .collect()
}

// ------------------------------------------------------------------------------------------
// Walking the dashboard.

/// Every non-row panel, with the title of the row it is under.
fn panels(d: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    let mut row = String::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            row = p["title"].as_str().unwrap_or_default().to_string();
            for nested in p["panels"].as_array().into_iter().flatten() {
                out.push((row.clone(), nested));
            }
        } else {
            out.push((row.clone(), p));
        }
    }
    out
}

fn targets(p: &Value) -> impl Iterator<Item = &Value> {
    p["targets"].as_array().into_iter().flatten()
}

fn variables(d: &Value) -> Vec<&Value> {
    d["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

/// The query of a variable (a string, or Grafana's `{"query": …}` object).
fn variable_query(v: &Value) -> &str {
    v["query"]
        .as_str()
        .or_else(|| v["query"]["query"].as_str())
        .unwrap_or_default()
}

/// Checks every query of the dashboard against a scrape; returns what is wrong.
fn check_queries(d: &Value, scrape: &Scrape) -> Vec<String> {
    let mut errs = Vec::new();
    let defined: BTreeSet<String> = variables(d)
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .chain(GRAFANA_VARIABLES.iter().map(|s| s.to_string()))
        .collect();
    let on_metric = |metric: &str, label: &str| {
        SCRAPE_LABELS.contains(&label) || scrape.labels(metric).is_some_and(|l| l.contains(label))
    };
    let check_selectors = |what: &str, q: &Query, errs: &mut Vec<String>, in_panel: bool| {
        for s in &q.selectors {
            let Some(labels) = scrape.labels(&s.metric) else {
                errs.push(format!("{what}: {}", scrape.missing(&s.metric)));
                continue;
            };
            for m in &s.matchers {
                if !on_metric(&s.metric, m) {
                    errs.push(format!(
                        "{what}: {}{{{m}=…}}: {} has no label {m} (it has {labels:?})",
                        s.metric, s.metric
                    ));
                }
            }
            // The dashboard's variables must filter every panel query.
            if in_panel {
                let mut want = vec!["job", "instance"];
                if labels.contains("direction") {
                    want.push("direction");
                }
                for w in want {
                    if !s.matchers.iter().any(|m| m == w) {
                        errs.push(format!("{what}: {} is not filtered by {w}", s.metric));
                    }
                }
            }
        }
        for v in &q.variables {
            if !defined.contains(v) {
                errs.push(format!(
                    "{what}: ${v} is not a dashboard or Grafana variable"
                ));
            }
        }
    };

    for (row, p) in panels(d) {
        let title = p["title"].as_str().unwrap_or_default();
        for t in targets(p) {
            let what = format!("{row} / {title} / {}", t["refId"].as_str().unwrap_or("?"));
            let expr = t["expr"].as_str().unwrap_or_default();
            let q = match analyze(expr) {
                Ok(q) => q,
                Err(e) => {
                    errs.push(format!("{what}: {e}"));
                    continue;
                }
            };
            if q.selectors.is_empty() {
                errs.push(format!("{what}: no remora metric in {expr:?}"));
            }
            check_selectors(&what, &q, &mut errs, true);
            for g in &q.groupings {
                for label in &g.labels {
                    for metric in &g.scope {
                        if scrape.labels(metric).is_some() && !on_metric(metric, label) {
                            errs.push(format!(
                                "{what}: {} ({label}) over {metric}, which has no label {label}",
                                g.clause
                            ));
                        }
                    }
                }
            }
            // What a legend prints must survive the aggregation (or be on the series).
            let by: BTreeSet<&String> = q
                .groupings
                .iter()
                .filter(|g| g.clause == "by")
                .flat_map(|g| &g.labels)
                .collect();
            for label in legend_labels(t["legendFormat"].as_str().unwrap_or_default()) {
                let ok = if by.is_empty() {
                    q.selectors.iter().any(|s| on_metric(&s.metric, &label))
                } else {
                    by.contains(&label)
                };
                if !ok {
                    errs.push(format!(
                        "{what}: legend {{{{{label}}}}} is not a label of the result"
                    ));
                }
            }
        }
    }

    for v in variables(d).into_iter().filter(|v| v["type"] == "query") {
        let name = v["name"].as_str().unwrap_or("?");
        let what = format!("variable {name}");
        let query = variable_query(v);
        let Some((selector, label)) = query
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.rsplit_once(','))
        else {
            errs.push(format!(
                "{what}: expected label_values(metric, label), got {query:?}"
            ));
            continue;
        };
        let label = label.trim();
        match analyze(selector) {
            Ok(q) if q.selectors.len() == 1 => {
                check_selectors(&what, &q, &mut errs, false);
                if !on_metric(&q.selectors[0].metric, label) {
                    errs.push(format!(
                        "{what}: {} has no label {label}",
                        q.selectors[0].metric
                    ));
                }
            }
            Ok(_) => errs.push(format!("{what}: expected one remora metric in {query:?}")),
            Err(e) => errs.push(format!("{what}: {e}")),
        }
    }
    errs
}

/// Metric names in the queries of the panels under each row.
fn metrics_by_row(d: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (row, p) in panels(d) {
        for t in targets(p) {
            if let Ok(q) = analyze(t["expr"].as_str().unwrap_or_default()) {
                out.entry(row.clone())
                    .or_default()
                    .extend(q.selectors.into_iter().map(|s| s.metric));
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------

/// Importable as-is: a datasource variable instead of a fixed data source, the variables the
/// panels filter by, sane ids and layout, and panels grouped under rows for workload, errors,
/// routes, endpoints, TLS/identity and drain, each showing its metrics.
#[test]
fn the_dashboard_is_importable_and_grouped() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "uid"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    assert!(d["id"].is_null(), "an importable dashboard has no id");

    let vars = variables(&d);
    let var = |name: &str| {
        *vars
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["job", "instance", "direction"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "${name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "${name}");
        assert!(variable_query(v).starts_with("label_values("), "${name}");
    }

    let top = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut rects: Vec<(&str, [u64; 4])> = Vec::new();
    let all: Vec<&Value> = top
        .iter()
        .chain(
            top.iter()
                .flat_map(|p| p["panels"].as_array().into_iter().flatten()),
        )
        .collect();
    for p in &all {
        let title = p["title"].as_str().expect("every panel has a title");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: id"));
        assert!(ids.insert(id), "{title}: id {id} used twice");
        let g = &p["gridPos"];
        let [x, _, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(w >= 1 && h >= 1 && x + w <= 24, "{title}: gridPos {g}");
        let ty = p["type"].as_str().unwrap_or_default();
        if ty == "row" {
            assert_eq!(h, 1, "{title}");
            continue;
        }
        assert!(
            ["timeseries", "stat", "table"].contains(&ty),
            "{title}: panel type {ty}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let mut refs = BTreeSet::new();
        let ts: Vec<&Value> = targets(p).collect();
        assert!(!ts.is_empty(), "{title}: no queries");
        for t in ts {
            let r = t["refId"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: refId"));
            assert!(refs.insert(r), "{title}: refId {r} twice");
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}/{r}: expr"
            );
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}/{r}");
            }
        }
    }
    // Expanded rows: everything on one grid, nothing overlapping.
    for p in top {
        let g = &p["gridPos"];
        let r = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or_default());
        rects.push((p["title"].as_str().unwrap_or_default(), r));
    }
    for (i, (a, [ax, ay, aw, ah])) in rects.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &rects[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "panels {a:?} and {b:?} overlap");
        }
    }

    let by_row = metrics_by_row(&d);
    let rows: Vec<&str> = top
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for (keyword, metrics) in GROUPS {
        let row = rows
            .iter()
            .find(|r| r.to_lowercase().contains(keyword))
            .unwrap_or_else(|| panic!("no row for {keyword}: rows are {rows:?}"));
        let shown = by_row.get(*row).cloned().unwrap_or_default();
        for m in *metrics {
            assert!(
                shown.contains(*m),
                "row {row:?} does not show {m}: {shown:?}"
            );
        }
    }

    // Golden signals: p50, p95 and p99 from the histogram, by direction.
    let workload = rows
        .iter()
        .find(|r| r.to_lowercase().contains("workload"))
        .unwrap();
    for q in ["0.5", "0.95", "0.99"] {
        let found = panels(&d)
            .into_iter()
            .filter(|(row, _)| row == workload)
            .flat_map(|(_, p)| targets(p))
            .filter_map(|t| t["expr"].as_str())
            .filter(|e| {
                e.replace(' ', "")
                    .starts_with(&format!("histogram_quantile({q},"))
            })
            .filter_map(|e| analyze(e).ok())
            .any(|a| {
                a.groupings.iter().any(|g| {
                    g.labels.iter().any(|l| l == "le")
                        && g.labels.iter().any(|l| l == "direction")
                        && g.scope
                            .iter()
                            .any(|m| m == "remora_request_duration_seconds_bucket")
                })
            });
        assert!(found, "no p{q} latency by direction in {workload:?}");
    }
}

/// The query reader itself, on the shapes the dashboard uses.
#[test]
fn promql_reader() {
    let q = analyze(
        r#"histogram_quantile(0.99, sum by (le, direction) (rate(remora_x_bucket{job=~"$job", direction=~"a,b}"}[$__rate_interval])))"#,
    )
    .unwrap();
    assert_eq!(q.selectors.len(), 1);
    assert_eq!(q.selectors[0].metric, "remora_x_bucket");
    assert_eq!(q.selectors[0].matchers, ["job", "direction"]);
    assert_eq!(q.groupings[0].labels, ["le", "direction"]);
    assert_eq!(q.groupings[0].scope, ["remora_x_bucket"]);
    assert_eq!(q.variables, ["job", "__rate_interval"]);
    let q = analyze("1 - sum(rate(remora_a[5m])) by (kind) / max by (x) (remora_b)").unwrap();
    assert_eq!(q.groupings[0].scope, ["remora_a"]);
    assert_eq!(q.groupings[1].scope, ["remora_b"]);
    assert!(analyze("sum(rate(remora_a[5m])").is_err());
    assert!(
        analyze("sum(rate(remoa_a[5m]))").is_err(),
        "a misspelt prefix"
    );
    assert!(analyze(r#"sum by (x) ({__name__="remora_a"})"#).is_err());
    assert_eq!(
        legend_labels("p50 {{direction}} {{ le }}"),
        ["direction", "le"]
    );
    let mut s = Scrape::default();
    s.add("# TYPE remora_a counter\nremora_a_total{x=\"1,}=\\\"\",y=\"\"} 1\nremora_b 0\n# EOF\n");
    assert_eq!(
        s.labels("remora_a_total")
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        ["x", "y"]
    );
    assert!(s.labels("remora_b").unwrap().is_empty());
    assert!(s.missing("remora_c").contains("not exposed"));
}

/// Two proxies over mTLS carry traffic; every query of the dashboard must match their scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_matches_what_the_proxies_expose() {
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.identity_dir = Some(pki.identity_dir("web"));
    let server = TestProxy::start(cfg).await;
    let mut cfg = config(refused_addr().await);
    cfg.identity_dir = Some(pki.identity_dir("client"));
    cfg.destinations = vec![
        format!("web.test:80={}#{WEB_ID}", server.inbound)
            .parse()
            .expect("destination"),
        dest("down.test:80", &[refused_addr().await]),
    ];
    let client = TestProxy::start(cfg).await;

    let via = |addr, authority| Route {
        name: authority,
        addr,
        authority,
    };
    let web = via(client.outbound, "web.test:80");
    let down = via(client.outbound, "down.test:80");
    let plain = via(server.inbound, "app.test:80");
    let code = ["-o", "/dev/null", "-w", "%{http_code}"];
    let grpc = [
        &code[..],
        &[
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "hello",
        ],
    ]
    .concat();
    // (route, path, curl arguments, expected status, requests)
    let calls: [(&Route, &str, &[&str], &str, usize); 4] = [
        (&web, "/remora.test.Echo/Unary", &grpc, "200", 4),
        (&web, "/", &code, "200", 3),
        // 502 (connect refused), then 503 while the endpoint backs off.
        (&down, "/", &code, "50", 2),
        (&plain, "/", &code, "200", 2),
    ];
    for (route, path, args, want, n) in calls {
        for _ in 0..n {
            let out = curl(route, path, args).await;
            assert!(
                out.stdout.starts_with(want),
                "{} {path}: {} {}",
                route.name,
                out.stdout,
                out.stderr
            );
        }
    }
    // Counted when the response ends, which may be just after curl saw it.
    let outbound: usize = calls[..3].iter().map(|c| c.4).sum();
    let inbound: usize = calls.iter().filter(|c| c.3 == "200").map(|c| c.4).sum();
    let counted =
        |m: &str, direction: &str| metric(m, "remora_requests_total", &[("direction", direction)]);
    wait_until("the requests to be counted", async || {
        counted(&client.metrics().await, "outbound") == outbound as f64
            && counted(&server.metrics().await, "inbound") == inbound as f64
    })
    .await;

    let (client_text, server_text) = (client.metrics().await, server.metrics().await);
    // The traffic did what the dashboard is about.
    assert_eq!(
        metric(
            &client_text,
            "remora_route_requests_total",
            &[
                ("route", "grpc"),
                ("grpc_method", "Unary"),
                ("peer_identity", WEB_ID)
            ]
        ),
        4.0,
        "{client_text}"
    );
    assert!(
        metric(&client_text, "remora_errors_total", &[]) >= 2.0,
        "{client_text}"
    );
    assert!(metric(&client_text, "remora_endpoint_failures_total", &[]) >= 2.0);
    assert!(
        metric(
            &server_text,
            "remora_tls_connections_total",
            &[("result", "mtls")]
        ) >= 1.0
    );
    assert!(
        metric(
            &server_text,
            "remora_identity_expiry_timestamp_seconds",
            &[]
        ) > 0.0
    );

    let mut scrape = Scrape::default();
    scrape.add(&client_text);
    scrape.add(&server_text);
    let d = dashboard();
    let errs = check_queries(&d, &scrape);
    assert!(
        errs.is_empty(),
        "the dashboard does not match /metrics:\n{}\n\nscrape:\n{client_text}",
        errs.join("\n")
    );

    // The check would catch a rename on either side.
    let renamed: Value = serde_json::from_str(
        &dashboard_text()
            .replace("remora_route_requests_total", "remora_route_request_total")
            .replace("grpc_method)", "grpc_methods)")
            .replace("{{grpc_service}}/", "{{service}}/")
            // The JSON text escapes the quotes of PromQL strings.
            .replace(r#"=~\"$instance\""#, r#"=~\"$pod\""#),
    )
    .expect("json");
    let errs = check_queries(&renamed, &scrape).join("\n");
    assert!(
        errs.contains("remora_route_request_total is not exposed"),
        "{errs}"
    );
    assert!(errs.contains("no label grpc_methods"), "{errs}");
    assert!(errs.contains("legend {{service}}"), "{errs}");
    assert!(errs.contains("$pod is not a dashboard"), "{errs}");
    let mut scrape = Scrape::default();
    scrape.add(&client_text.replace("remora_endpoint_ready", "remora_endpoint_up"));
    scrape.add(&server_text.replace("remora_endpoint_ready", "remora_endpoint_up"));
    let errs = check_queries(&d, &scrape).join("\n");
    assert!(
        errs.contains("remora_endpoint_ready is not exposed"),
        "{errs}"
    );
}
