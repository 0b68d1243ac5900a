//! Trace completeness and tail sampling, decided once per trace when the trace is whole.
//!
//! Every span that arrives is *observed*: which spans a trace has, which parents they name, whether one
//! failed, when it started and ended, and which NATS messages it published (PRODUCER spans) and which of
//! those were consumed (a CONSUMER span whose parent is the producer, or, when consumers start their own
//! trace, whose span link points at it). A trace is **complete** when its root has arrived, no span names a
//! parent that is missing, and every message it published was consumed.
//!
//! A trace is **decided** once it has been complete and quiet for [`TailPolicy::quiet`] (longer than the
//! services' export interval, so the last batch of a hop is not cut off), or when
//! [`TailPolicy::decision_wait`] has passed since its first span, complete or not. A trace whose consumer
//! never came by then is counted as `consumer_missing`: the e-mail story of the seed, measured.
//!
//! With tail sampling on (`COLLECTOR_TAIL_SAMPLING_PERCENT` below 100) spans wait in memory until the
//! decision, and a trace is kept when, in this order:
//! 1. a span in it failed (`error`);
//! 2. it lasted at least `COLLECTOR_TAIL_SLOW_MS` end to end, late NATS consumers included (`slow`);
//! 3. a consumer trace follows a producer trace that was kept (`linked`), so the two halves stay together;
//! 4. it is incomplete when the decision wait runs out (`incomplete`): lost messages are what one looks for;
//! 5. its trace id falls in the kept share (`probabilistic`), decided from the id's random part, so every
//!    collector keeps the same traces.
//!
//! The rest is dropped. A consumer trace that links to a producer trace is decided together with it.
//! Spans that arrive after their trace's decision follow it. With sampling off, spans are stored as they
//! arrive and only completeness is counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use otlp_embedded::proto::trace::v1::{ResourceSpans, ScopeSpans, Span};

use super::metrics::SpanMetrics;

type TraceId = Vec<u8>;
type SpanId = Vec<u8>;

/// Traces waiting for a decision at most; past it, new traces are kept without waiting (`overflow`).
const MAX_PENDING: usize = 100_000;
/// Decisions remembered for spans that arrive late.
const MAX_DECIDED: usize = 200_000;

/// What the tail sampler keeps: every error, every slow trace, and a share of the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct TailPolicy {
    /// `COLLECTOR_TAIL_SAMPLING_PERCENT`: share of ordinary traces kept, 0 to 100 (default 100: tail
    /// sampling off, every span stored as it arrives).
    pub percent: f64,
    /// `COLLECTOR_TAIL_SLOW_MS`: traces at least this long end to end are kept (default 1000).
    pub slow: Duration,
    /// `COLLECTOR_TAIL_DECISION_WAIT_MS`: the longest a trace waits for its decision (default 30000).
    pub decision_wait: Duration,
    /// `COLLECTOR_TAIL_QUIET_MS`: how long a complete trace must receive nothing before it is decided
    /// (default 2000, four times the services' export interval).
    pub quiet: Duration,
}

impl Default for TailPolicy {
    fn default() -> Self {
        Self {
            percent: 100.0,
            slow: Duration::from_millis(1000),
            decision_wait: Duration::from_millis(30_000),
            quiet: Duration::from_millis(2000),
        }
    }
}

impl TailPolicy {
    /// From `COLLECTOR_TAIL_*` as `lookup` finds them (the environment, or a test stack's variables).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let defaults = Self::default();
        let number = |name: &str, default: f64| -> anyhow::Result<f64> {
            match lookup(name) {
                None => Ok(default),
                Some(text) => text
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|value| value.is_finite() && *value >= 0.0)
                    .ok_or_else(|| {
                        anyhow::anyhow!("{name}={text:?} is not a number of at least 0")
                    }),
            }
        };
        let millis = |name: &str, default: Duration| -> anyhow::Result<Duration> {
            number(name, default.as_millis() as f64).map(|ms| Duration::from_millis(ms as u64))
        };
        let percent = number("COLLECTOR_TAIL_SAMPLING_PERCENT", defaults.percent)?;
        if percent > 100.0 {
            anyhow::bail!("COLLECTOR_TAIL_SAMPLING_PERCENT={percent} is above 100");
        }
        Ok(Self {
            percent,
            slow: millis("COLLECTOR_TAIL_SLOW_MS", defaults.slow)?,
            decision_wait: millis("COLLECTOR_TAIL_DECISION_WAIT_MS", defaults.decision_wait)?,
            quiet: millis("COLLECTOR_TAIL_QUIET_MS", defaults.quiet)?,
        })
    }

    /// Whether spans wait for a decision (below 100 %) or are stored as they arrive.
    pub fn samples(&self) -> bool {
        self.percent < 100.0
    }

    /// The probabilistic part: the trace id's last eight bytes (its random part in W3C ids) against the
    /// kept share.
    fn in_kept_share(&self, trace_id: &[u8]) -> bool {
        let mut tail = [0_u8; 8];
        let start = trace_id.len().saturating_sub(8);
        let bytes = trace_id.get(start..).unwrap_or_default();
        tail[8 - bytes.len()..].copy_from_slice(bytes);
        let position = u64::from_be_bytes(tail) as f64 / u64::MAX as f64;
        position < self.percent / 100.0
    }
}

/// What is known about one trace still waiting for its decision.
#[derive(Debug)]
struct Pending {
    first_seen: Instant,
    last_seen: Instant,
    spans: HashSet<SpanId>,
    parents: HashSet<SpanId>,
    has_root: bool,
    error: bool,
    start_ns: u64,
    end_ns: u64,
    producers: HashSet<SpanId>,
    consumed: HashSet<SpanId>,
    /// The producer trace a consumer trace links to (consumers that start their own trace).
    follows: Option<TraceId>,
    /// Spans held until the decision (tail sampling only).
    held: Vec<ResourceSpans>,
}

impl Pending {
    fn new(now: Instant) -> Self {
        Self {
            first_seen: now,
            last_seen: now,
            spans: HashSet::new(),
            parents: HashSet::new(),
            has_root: false,
            error: false,
            start_ns: u64::MAX,
            end_ns: 0,
            producers: HashSet::new(),
            consumed: HashSet::new(),
            follows: None,
            held: Vec::new(),
        }
    }

    fn complete(&self) -> bool {
        self.has_root
            && self
                .parents
                .iter()
                .all(|parent| self.spans.contains(parent))
            && self
                .producers
                .iter()
                .all(|producer| self.consumed.contains(producer))
    }
}

/// The trace tracker: observes spans, holds them while sampling, decides.
#[derive(Debug)]
pub struct Tracker {
    policy: TailPolicy,
    pending: HashMap<TraceId, Pending>,
    decided: HashMap<TraceId, bool>,
    decided_order: VecDeque<TraceId>,
}

impl Tracker {
    pub fn new(policy: TailPolicy) -> Self {
        Self {
            policy,
            pending: HashMap::new(),
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
        }
    }

    /// Traces waiting for their decision.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Observes one export's spans and returns what to store now: everything when not sampling, spans of
    /// traces already kept, and traces past [`MAX_PENDING`].
    pub fn accept(
        &mut self,
        resource_spans: Vec<ResourceSpans>,
        now: Instant,
        metrics: &SpanMetrics,
    ) -> Vec<ResourceSpans> {
        let mut store = Vec::new();
        for (trace_id, part) in split_by_trace(resource_spans) {
            match self.decided.get(&trace_id) {
                Some(true) => {
                    store.push(part);
                    continue;
                }
                Some(false) => continue,
                None => {}
            }
            if !self.pending.contains_key(&trace_id) && self.pending.len() >= MAX_PENDING {
                metrics.sampling_decided("keep", "overflow");
                self.remember(trace_id, true);
                store.push(part);
                continue;
            }
            self.observe(&trace_id, &part, now);
            if self.policy.samples() {
                if let Some(pending) = self.pending.get_mut(&trace_id) {
                    pending.held.push(part);
                }
            } else {
                store.push(part);
            }
        }
        store
    }

    fn observe(&mut self, trace_id: &TraceId, part: &ResourceSpans, now: Instant) {
        let mut links: Vec<(TraceId, SpanId)> = Vec::new();
        {
            let pending = self
                .pending
                .entry(trace_id.clone())
                .or_insert_with(|| Pending::new(now));
            pending.last_seen = now;
            for span in part.scope_spans.iter().flat_map(|scope| &scope.spans) {
                pending.spans.insert(span.span_id.clone());
                if span.parent_span_id.is_empty() {
                    pending.has_root = true;
                } else {
                    pending.parents.insert(span.parent_span_id.clone());
                }
                if span.status.as_ref().is_some_and(|status| status.code == 2) {
                    pending.error = true;
                }
                pending.start_ns = pending.start_ns.min(span.start_time_unix_nano);
                pending.end_ns = pending.end_ns.max(span.end_time_unix_nano);
                match span.kind {
                    4 => {
                        pending.producers.insert(span.span_id.clone());
                    }
                    5 if !span.parent_span_id.is_empty() => {
                        pending.consumed.insert(span.parent_span_id.clone());
                    }
                    _ => {}
                }
                if span.kind == 5 {
                    for link in &span.links {
                        if link.trace_id != *trace_id {
                            pending.follows = Some(link.trace_id.clone());
                            links.push((link.trace_id.clone(), link.span_id.clone()));
                        }
                    }
                }
            }
        }
        for (producer_trace, producer_span) in links {
            if self.decided.contains_key(&producer_trace) {
                continue;
            }
            self.pending
                .entry(producer_trace)
                .or_insert_with(|| Pending::new(now))
                .consumed
                .insert(producer_span);
        }
    }

    /// Decides every trace that is ready and returns the spans to store.
    pub fn decide_ready(&mut self, now: Instant, metrics: &SpanMetrics) -> Vec<ResourceSpans> {
        let policy = self.policy.clone();
        let ready: Vec<TraceId> = self
            .pending
            .iter()
            .filter(|(_, pending)| {
                let waited_out = now.duration_since(pending.first_seen) >= policy.decision_wait;
                let settled =
                    pending.complete() && now.duration_since(pending.last_seen) >= policy.quiet;
                // A consumer trace is decided with the producer trace it follows, unless it waited out.
                let with_producer = pending
                    .follows
                    .as_ref()
                    .is_some_and(|producer| self.pending.contains_key(producer));
                waited_out || (settled && !with_producer)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut store = Vec::new();
        for head in ready {
            let Some(first) = self.pending.remove(&head) else {
                continue; // decided with its producer trace already
            };
            let followers: Vec<TraceId> = self
                .pending
                .iter()
                .filter(|(_, pending)| pending.follows.as_ref() == Some(&head))
                .map(|(id, _)| id.clone())
                .collect();
            let inherited = first
                .follows
                .as_ref()
                .and_then(|producer| self.decided.get(producer))
                .copied();
            let complete = first.complete();
            let mut members = vec![(head, first)];
            for follower in followers {
                if let Some(pending) = self.pending.remove(&follower) {
                    members.push((follower, pending));
                }
            }
            metrics.trace_decided(if complete {
                "complete"
            } else {
                "consumer_missing"
            });
            let (keep, why) = if !policy.samples() {
                (true, "all")
            } else {
                let start = members.iter().map(|(_, p)| p.start_ns).min().unwrap_or(0);
                let end = members.iter().map(|(_, p)| p.end_ns).max().unwrap_or(0);
                let lasted = Duration::from_nanos(end.saturating_sub(start));
                if members.iter().any(|(_, p)| p.error) {
                    (true, "error")
                } else if lasted >= policy.slow {
                    (true, "slow")
                } else if let Some(inherited) = inherited {
                    (inherited, "linked")
                } else if !complete {
                    (true, "incomplete")
                } else {
                    let kept = policy.in_kept_share(&members[0].0);
                    (kept, "probabilistic")
                }
            };
            if policy.samples() {
                metrics.sampling_decided(if keep { "keep" } else { "drop" }, why);
            }
            for (id, pending) in members {
                if keep {
                    store.extend(pending.held);
                }
                self.remember(id, keep);
            }
        }
        store
    }

    fn remember(&mut self, trace_id: TraceId, keep: bool) {
        if self.decided.insert(trace_id.clone(), keep).is_none() {
            self.decided_order.push_back(trace_id);
        }
        while self.decided_order.len() > MAX_DECIDED {
            if let Some(oldest) = self.decided_order.pop_front() {
                self.decided.remove(&oldest);
            }
        }
    }
}

/// One export's spans, regrouped per trace (each part keeps its resource and scopes).
fn split_by_trace(resource_spans: Vec<ResourceSpans>) -> Vec<(TraceId, ResourceSpans)> {
    let mut parts = Vec::new();
    for ResourceSpans {
        resource,
        scope_spans,
        schema_url,
    } in resource_spans
    {
        let mut by_trace: HashMap<TraceId, Vec<ScopeSpans>> = HashMap::new();
        for ScopeSpans {
            scope,
            spans,
            schema_url: scope_schema_url,
        } in scope_spans
        {
            let mut per_trace: HashMap<TraceId, Vec<Span>> = HashMap::new();
            for span in spans {
                per_trace
                    .entry(span.trace_id.clone())
                    .or_default()
                    .push(span);
            }
            for (trace_id, spans) in per_trace {
                by_trace.entry(trace_id).or_default().push(ScopeSpans {
                    scope: scope.clone(),
                    spans,
                    schema_url: scope_schema_url.clone(),
                });
            }
        }
        for (trace_id, scope_spans) in by_trace {
            parts.push((
                trace_id,
                ResourceSpans {
                    resource: resource.clone(),
                    scope_spans,
                    schema_url: schema_url.clone(),
                },
            ));
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use otlp_embedded::proto::trace::v1::{Status, span::Link};

    fn span(trace: u8, id: u8, parent: Option<u8>, kind: i32, ms: (u64, u64)) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            kind,
            start_time_unix_nano: ms.0 * 1_000_000,
            end_time_unix_nano: ms.1 * 1_000_000,
            ..Default::default()
        }
    }

    fn batch(spans: Vec<Span>) -> Vec<ResourceSpans> {
        vec![ResourceSpans {
            resource: None,
            scope_spans: vec![ScopeSpans {
                scope: None,
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }]
    }

    fn sampling(percent: f64) -> TailPolicy {
        TailPolicy {
            percent,
            slow: Duration::from_millis(1000),
            decision_wait: Duration::from_secs(30),
            quiet: Duration::from_secs(2),
        }
    }

    fn stored_traces(parts: &[ResourceSpans]) -> HashSet<u8> {
        parts
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.trace_id[0])
            .collect()
    }

    #[test]
    fn a_trace_waits_for_its_late_consumer_then_is_decided() {
        let metrics = SpanMetrics::default();
        let mut tracker = Tracker::new(sampling(0.0));
        let t0 = Instant::now();
        // Root and producer first; the consumer comes 5 s later.
        let stored = tracker.accept(
            batch(vec![
                span(1, 1, None, 2, (0, 10)),
                span(1, 2, Some(1), 4, (5, 6)),
            ]),
            t0,
            &metrics,
        );
        assert!(stored.is_empty());
        assert!(
            tracker
                .decide_ready(t0 + Duration::from_secs(4), &metrics)
                .is_empty()
        );
        assert_eq!(
            tracker.pending(),
            1,
            "not complete: the message was not consumed yet"
        );
        tracker.accept(
            batch(vec![span(1, 3, Some(2), 5, (7, 9))]),
            t0 + Duration::from_secs(5),
            &metrics,
        );
        assert!(
            tracker
                .decide_ready(t0 + Duration::from_secs(6), &metrics)
                .is_empty()
        );
        assert_eq!(tracker.pending(), 1, "complete, but not yet quiet");
        tracker.decide_ready(t0 + Duration::from_secs(8), &metrics);
        assert_eq!(tracker.pending(), 0);
        let text = metrics.render(0);
        assert!(
            text.contains("tracehop_traces_total{completeness=\"complete\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("decision=\"drop\",policy=\"probabilistic\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn errors_slow_and_incomplete_traces_are_kept_and_late_spans_follow() {
        let metrics = SpanMetrics::default();
        let mut tracker = Tracker::new(sampling(0.0));
        let t0 = Instant::now();
        let mut failed = span(2, 1, None, 2, (0, 10));
        failed.status = Some(Status {
            code: 2,
            message: String::new(),
        });
        let parts = batch(vec![
            failed,
            span(3, 1, None, 2, (0, 1500)),
            span(4, 1, None, 2, (0, 10)),
            span(4, 2, Some(1), 4, (1, 2)),
        ]);
        tracker.accept(parts, t0, &metrics);
        let kept = stored_traces(&tracker.decide_ready(t0 + Duration::from_secs(3), &metrics));
        assert_eq!(kept, HashSet::from([2, 3]));
        let kept = stored_traces(&tracker.decide_ready(t0 + Duration::from_secs(31), &metrics));
        assert_eq!(kept, HashSet::from([4]), "its consumer never came");
        let late = tracker.accept(
            batch(vec![span(4, 3, Some(2), 5, (40, 41))]),
            t0 + Duration::from_secs(40),
            &metrics,
        );
        assert_eq!(stored_traces(&late), HashSet::from([4]));
        let text = metrics.render(0);
        assert!(
            text.contains("completeness=\"consumer_missing\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_linked_consumer_trace_is_decided_with_its_producer() {
        let metrics = SpanMetrics::default();
        let mut tracker = Tracker::new(sampling(0.0));
        let t0 = Instant::now();
        let mut consumer = span(6, 9, None, 5, (5, 1600));
        consumer.links.push(Link {
            trace_id: vec![5; 16],
            span_id: vec![2; 8],
            ..Default::default()
        });
        tracker.accept(
            batch(vec![
                span(5, 1, None, 2, (0, 10)),
                span(5, 2, Some(1), 4, (1, 2)),
                consumer,
            ]),
            t0,
            &metrics,
        );
        let kept = stored_traces(&tracker.decide_ready(t0 + Duration::from_secs(3), &metrics));
        assert_eq!(
            kept,
            HashSet::from([5, 6]),
            "slow end to end through the link: both halves kept"
        );
        assert!(metrics.render(0).contains("completeness=\"complete\"} 1"));
    }

    #[test]
    fn the_kept_share_follows_the_percentage() {
        let policy = sampling(10.0);
        // Random ids, as W3C trace ids are (a UUID's variant bits would skew the test).
        let kept = (0..10_000)
            .filter(|_| policy.in_kept_share(&rand::random::<[u8; 16]>()))
            .count();
        assert!((800..1200).contains(&kept), "{kept}");
        assert!(!sampling(0.0).in_kept_share(&[0xff; 16]));
        assert!(TailPolicy::from_lookup(|_| Some("101".into())).is_err());
        assert_eq!(
            TailPolicy::from_lookup(|_| None).unwrap(),
            TailPolicy::default()
        );
    }
}
