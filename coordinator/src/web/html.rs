//! The pages as HTML strings: `/`, `/sweeps/NAME`, the token form and error pages. Every string
//! from outside goes through [`escape`] (text and attribute values alike); sweep names in links
//! are percent-encoded. `page.js` draws the same rows from the JSON when it polls, so a cell here
//! and there say the same thing (the class names are shared).

use std::fmt::Write;

use super::access::percent_encode;
use super::view::{Figure, JobView, Overview, SweepDetail, SweepSummary, WorkerView};

/// `s` safe as HTML text and as a quoted attribute value: `& < > " '` as character references.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration as `45s`, `12m 05s`, `3h 07m`, `2d 04h`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "–".into();
    }
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn ago(now_ms: i64, at_ms: i64) -> String {
    format!("{} ago", duration((now_ms - at_ms).max(0) as f64 / 1000.0))
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A page around `main`: the header, the style and the script (which polls `api`, if any).
fn document(title: &str, api: Option<&str>, data: &str, main: &str) -> String {
    let api = api.map_or(String::new(), |a| format!(" data-api=\"{}\"", escape(a)));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · prunesweep</title><link rel=\"stylesheet\" href=\"/static/page.css\"></head>\n\
         <body{api}{data}><header><a class=\"home\" href=\"/\">prunesweep</a>\
         <span id=\"updated\">read at server time; updates every 2 s</span></header>\n<main>{main}</main>\n\
         <script src=\"/static/page.js\"></script></body></html>\n",
        title = escape(title),
    )
}

/// A page with a heading and one paragraph (errors); `home` adds a link back to `/`.
pub fn message_page(title: &str, message: &str, home: bool) -> String {
    let back = if home { "<p><a href=\"/\">all sweeps</a></p>" } else { "" };
    let main = format!("<h1>{}</h1><p class=\"message\">{}</p>{back}", escape(title), escape(message));
    document(title, None, "", &main)
}

/// The page a browser gets without a valid token: why, and a field that sends it as `?token=`.
pub fn login_page(why: &str) -> String {
    let main = format!(
        "<h1>Token needed</h1><p class=\"message\" id=\"refused\">{}</p>\
         <form method=\"get\"><label>User token <input type=\"password\" name=\"token\" autocomplete=\"off\" \
         required></label> <button type=\"submit\">Open</button></form>\
         <p class=\"hint\">The token is checked as for <code>coordinator status</code>, then kept in an HttpOnly \
         cookie for this site.</p>",
        escape(why)
    );
    document("Token needed", None, "", &main)
}

fn bar(done: u32, total: u32) -> String {
    let pct = if total == 0 { 0.0 } else { 100.0 * f64::from(done) / f64::from(total) };
    format!("<div class=\"bar\" title=\"{pct:.0}%\"><div style=\"width:{pct:.1}%\"></div></div>")
}

fn sweep_link(name: &str) -> String {
    format!("<a href=\"/sweeps/{}\">{}</a>", percent_encode(name), escape(name))
}

fn sweep_row(s: &SweepSummary) -> String {
    let c = &s.counts;
    format!(
        "<tr data-sweep=\"{name}\"><td class=\"name\">{link}</td><td><span class=\"state {state}\">{state}</span></td>\
         <td>{bar}</td><td class=\"done\" data-done=\"{done}\">{done} / {total}</td><td class=\"num\">{running}</td>\
         <td class=\"num\">{waiting}</td><td class=\"num failed\">{failed}</td><td class=\"num\">{cancelled}</td>\
         <td class=\"eta\">{eta}</td></tr>",
        name = escape(&s.name),
        link = sweep_link(&s.name),
        state = escape(&s.state),
        bar = bar(s.done, s.total),
        done = s.done,
        total = s.total,
        running = c.leased,
        waiting = c.blocked + c.pending,
        failed = c.failed,
        cancelled = c.cancelled,
        eta = opt(s.eta_seconds, duration),
    )
}

const SWEEP_HEAD: &str = "<tr><th>sweep</th><th>state</th><th>progress</th><th>done</th><th>running</th>\
                          <th>waiting</th><th>failed</th><th>cancelled</th><th>ETA</th></tr>";

/// `eval 40%`, `eval`, or `–`.
fn phase_text(phase: Option<&str>, progress: Option<f64>) -> String {
    match (phase, progress) {
        (Some(p), Some(f)) => format!("{} {:.0}%", escape(p), 100.0 * f),
        (Some(p), None) => escape(p),
        (None, _) => "–".into(),
    }
}

fn worker_row(w: &WorkerView, now_ms: i64) -> String {
    let job = match (w.job_id, &w.sweep) {
        (Some(id), Some(sweep)) => format!("{id} ({})", sweep_link(sweep)),
        (Some(id), None) => id.to_string(),
        _ => "–".into(),
    };
    format!(
        "<tr><td class=\"name\">{name}</td><td><span class=\"state {live}\">{live}</span></td><td>{device}</td>\
         <td class=\"num\">{memory}</td><td class=\"num\">{free}</td><td>{job}</td><td>{phase}</td>\
         <td class=\"num\">{rate}</td><td>{seen}</td><td>{version}</td></tr>",
        name = escape(&w.name),
        live = if w.live { "live" } else { "gone" },
        device = escape(&w.device),
        memory = opt(w.memory_bytes, gib),
        free = opt(w.free_memory_bytes, gib),
        phase = phase_text(w.phase.as_deref(), w.progress),
        rate = opt(w.tokens_per_second, |r| format!("{r:.0}")),
        seen = ago(now_ms, w.last_seen_ms),
        version = escape(&w.version),
    )
}

const WORKER_HEAD: &str = "<tr><th>worker</th><th>status</th><th>device</th><th>memory</th><th>free</th>\
                           <th>job</th><th>phase</th><th>tokens/s</th><th>last seen</th><th>version</th></tr>";

fn workers_section(workers: &[WorkerView], now_ms: i64) -> String {
    let rows: String = workers.iter().map(|w| worker_row(w, now_ms)).collect();
    format!("<section><h2>Workers</h2><table id=\"workers\"><thead>{WORKER_HEAD}</thead><tbody>{rows}</tbody></table></section>")
}

/// `/`: the sweeps and the workers.
pub fn overview_page(o: &Overview) -> String {
    let rows: String = o.sweeps.iter().map(sweep_row).collect();
    let main = format!(
        "<h1>Sweeps</h1><table id=\"sweeps\"><thead>{SWEEP_HEAD}</thead><tbody>{rows}</tbody></table>\
         <p class=\"hint\">ETA: each unfinished job counts the mean duration of the sweep's finished jobs of its \
         kind, shared among the jobs running now.</p>{workers}",
        workers = workers_section(&o.workers, o.now_ms),
    );
    document("sweeps", Some("/api/sweeps"), " data-view=\"overview\"", &main)
}

fn job_row(j: &JobView, now_ms: i64) -> String {
    let progress = match j.progress {
        Some(p) => {
            format!("<div class=\"bar small\"><div style=\"width:{:.1}%\"></div></div> {:.0}%", 100.0 * p, 100.0 * p)
        }
        None => "–".into(),
    };
    format!(
        "<tr data-job=\"{id}\"><td class=\"num\">{id}</td><td>{kind}</td><td>{cell}</td>\
         <td><span class=\"state {state}\">{state}</span></td><td>{worker}</td><td>{phase}</td><td>{progress}</td>\
         <td class=\"num\">{rate}</td><td>{beat}</td><td class=\"num\">{attempts}/{max}</td><td class=\"num\">{secs}</td>\
         <td class=\"results\">{results}</td><td class=\"error\">{error}</td></tr>",
        id = j.id,
        kind = escape(&j.kind),
        cell = escape(&j.cell),
        state = escape(&j.state),
        worker = opt(j.worker.as_deref(), escape),
        phase = opt(j.phase.as_deref(), escape),
        rate = opt(j.tokens_per_second, |r| format!("{r:.0}")),
        beat = opt(j.heartbeat_at_ms, |t| ago(now_ms, t)),
        attempts = j.attempts,
        max = j.max_attempts,
        secs = opt(j.seconds, duration),
        results = escape(&j.results),
        error = opt(j.error.as_deref(), escape),
    )
}

const JOB_HEAD: &str = "<tr><th>job</th><th>kind</th><th>cell</th><th>state</th><th>worker</th><th>phase</th>\
                        <th>progress</th><th>tokens/s</th><th>heartbeat</th><th>attempts</th><th>time</th>\
                        <th>results</th><th>last error</th></tr>";

fn figures(id: &str, figures: &[Figure], none: &str) -> String {
    let inner: String = if figures.is_empty() {
        format!("<p class=\"hint\">{}</p>", escape(none))
    } else {
        // The SVG is plotters' output, its text XML-escaped; the caption is escaped here.
        figures
            .iter()
            .map(|f| {
                format!(
                    "<figure><div class=\"svg\">{}</div><figcaption>{}</figcaption></figure>",
                    f.svg,
                    escape(&f.title)
                )
            })
            .collect()
    };
    format!("<div class=\"figure-set\" id=\"{id}\">{inner}</div>")
}

/// `/sweeps/NAME`: the sweep's counts, its jobs, its charts and heatmaps, the workers.
pub fn sweep_page(d: &SweepDetail) -> String {
    let s = &d.sweep;
    let c = &s.counts;
    let rows: String = d.jobs.iter().map(|j| job_row(j, d.now_ms)).collect();
    let more = if d.jobs_not_shown > 0 {
        format!("<p class=\"hint\">{} more jobs not listed.</p>", d.jobs_not_shown)
    } else {
        String::new()
    };
    let mut main = String::new();
    let _ = write!(
        main,
        "<p><a href=\"/\">all sweeps</a></p><h1 id=\"sweep-name\">{name}</h1>\
         <p class=\"summary\" id=\"summary\"><span class=\"state {state}\">{state}</span> \
         <span class=\"done\" data-done=\"{done}\">{done} / {total}</span> done · \
         <span class=\"running\">{running}</span> running · <span class=\"waiting\">{waiting}</span> waiting · \
         <span class=\"failed\">{failed}</span> failed · <span class=\"cancelled\">{cancelled}</span> cancelled · \
         mean job <span class=\"mean\">{mean}</span> · ETA <span class=\"eta\">{eta}</span></p>{bar}",
        name = escape(&s.name),
        state = escape(&s.state),
        done = s.done,
        total = s.total,
        running = c.leased,
        waiting = c.blocked + c.pending,
        failed = c.failed,
        cancelled = c.cancelled,
        mean = opt(s.mean_job_seconds, duration),
        eta = opt(s.eta_seconds, duration),
        bar = bar(s.done, s.total),
    );
    let _ = write!(
        main,
        "<section><h2>Accuracy versus depth · layer distances</h2><div class=\"figures\">{charts}{heatmaps}</div>\
         </section><section><h2>Jobs</h2><div class=\"scroll\"><table id=\"jobs\"><thead>{JOB_HEAD}</thead>\
         <tbody>{rows}</tbody></table></div>{more}</section>{workers}",
        charts = figures(
            "charts",
            d.charts.as_deref().unwrap_or_default(),
            "No results yet: the charts appear as jobs finish."
        ),
        heatmaps = figures("heatmaps", d.heatmaps.as_deref().unwrap_or_default(), "No model scored yet."),
        workers = workers_section(&d.workers, d.now_ms),
    );
    let api = format!("/api/sweeps/{}", percent_encode(&s.name));
    let data = format!(" data-view=\"sweep\" data-key=\"{}\"", escape(&d.results_key));
    document(&s.name, Some(&api), &data, &main)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::view::{Counts, SweepSummary};

    const HOSTILE: &str = "<script>alert(\"x\")</script>&'";

    fn summary(name: &str) -> SweepSummary {
        let counts = Counts { pending: 2, leased: 1, succeeded: 3, failed: 1, ..Counts::default() };
        SweepSummary {
            name: name.into(),
            state: "active".into(),
            priority: 0,
            created_at_ms: 0,
            counts,
            total: counts.total(),
            done: counts.done(),
            mean_job_seconds: Some(65.0),
            eta_seconds: Some(130.0),
        }
    }

    fn worker(name: &str) -> WorkerView {
        WorkerView {
            id: "w".into(),
            name: name.into(),
            device: "cpu".into(),
            memory_bytes: Some(1 << 30),
            free_memory_bytes: None,
            version: "v".into(),
            last_seen_ms: 1_000,
            live: true,
            job_id: Some(3),
            sweep: Some(name.into()),
            phase: Some("score".into()),
            progress: Some(0.25),
            tokens_per_second: Some(1234.4),
        }
    }

    #[test]
    fn escape_covers_text_and_attributes() {
        assert_eq!(escape(HOSTILE), "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;");
        assert_eq!(escape("tiny-test_1"), "tiny-test_1");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(44.6), "45s");
        assert_eq!(duration(725.0), "12m 05s");
        assert_eq!(duration(3.0 * 3600.0 + 7.0 * 60.0), "3h 07m");
        assert_eq!(duration(2.0 * 86400.0 + 4.0 * 3600.0), "2d 04h");
        assert_eq!(duration(f64::NAN), "–");
    }

    #[test]
    fn overview_escapes_every_outside_string() {
        let o = Overview { now_ms: 61_000, sweeps: vec![summary(HOSTILE)], workers: vec![worker(HOSTILE)] };
        let page = overview_page(&o);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
        // The link percent-encodes the name; the counts, ETA and worker are there.
        assert!(page.contains("href=\"/sweeps/%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E%26%27\""), "{page}");
        assert!(page.contains("data-done=\"4\">4 / 7</td>"));
        assert!(page.contains("<td class=\"eta\">2m 10s</td>"));
        assert!(page.contains("<td class=\"num\">1234</td>") && page.contains("1m 00s ago"));
        assert!(page.contains("<td>score 25%</td>"), "the worker's phase and progress");
        assert_eq!(page.matches("<script").count(), 1, "only the page's own script tag");
    }

    #[test]
    fn sweep_page_escapes_jobs_and_keeps_figures() {
        let job = JobView {
            id: 7,
            kind: "cell".into(),
            cell: format!("{HOSTILE} · angular · 25% · none"),
            state: "failed".into(),
            worker: Some(HOSTILE.into()),
            phase: None,
            progress: Some(0.5),
            tokens_per_second: None,
            heartbeat_at_ms: None,
            attempts: 2,
            max_attempts: 2,
            error: Some(format!("[runtime] {HOSTILE}")),
            seconds: Some(3.0),
            results: String::new(),
        };
        let figure = Figure { title: HOSTILE.into(), svg: "<svg id=\"chart-1\"></svg>".into() };
        let d = SweepDetail {
            now_ms: 0,
            sweep: summary(HOSTILE),
            jobs: vec![job],
            jobs_not_shown: 0,
            results_key: "3-1-0-7".into(),
            charts: Some(vec![figure]),
            heatmaps: None,
            workers: vec![worker("w1")],
        };
        let page = sweep_page(&d);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("[runtime] &lt;script&gt;"));
        assert!(page.contains("<svg id=\"chart-1\"></svg>"), "the figure is inlined");
        assert!(page.contains("<td class=\"num\">2/2</td>") && page.contains("50%"));
        assert!(page.contains("data-key=\"3-1-0-7\"") && page.contains("No model scored yet."));
        assert!(page.contains("data-api=\"/api/sweeps/%3Cscript%3E"));
    }

    #[test]
    fn login_and_message_pages_escape() {
        assert!(login_page(HOSTILE).contains("&lt;script&gt;") && !login_page(HOSTILE).contains("<script>alert"));
        let page = message_page("No such sweep", &format!("no sweep named {HOSTILE:?}"), true);
        assert!(!page.contains("<script>alert") && page.contains("href=\"/\""));
    }
}
