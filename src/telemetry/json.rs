//! JSON log lines with the `caller` and `rpc` of the call they were logged in
//! ([`super::call`]), and the OpenTelemetry `trace_id` and `span_id` of their span, so a log
//! search and a trace search meet. The line itself is tracing-subscriber's JSON format; only
//! these members are added.

use super::call;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use std::fmt::{self, Write as _};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::registry::LookupSpan;

pub(super) struct JsonWithTraceIds {
    inner: Format<Json>,
}

impl JsonWithTraceIds {
    pub(super) fn new() -> Self {
        JsonWithTraceIds {
            inner: Format::default()
                .json()
                .flatten_event(true)
                .with_target(true)
                .with_current_span(true)
                .with_span_list(false),
        }
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The log layer does not see every span (a call's server span is left out), so the
        // span the line was logged in is asked of the dispatcher when the layer knows none.
        let span = ctx
            .parent_span()
            .map(|span| span.id())
            .or_else(|| tracing::Span::current().id());
        let members = members(call::current().as_ref(), ids_of(span.as_ref()));
        writer.write_str(&with_members(&line, &members))
    }
}

/// The members added to a line, each with a leading comma: `,"caller":"…","rpc":"…"` and
/// `,"trace_id":"…","span_id":"…"`, those that are known.
fn members(call: Option<&call::Call>, ids: Option<(TraceId, SpanId)>) -> String {
    let mut out = String::new();
    if let Some(call) = call {
        // A configured name; escaped all the same, as a JSON string.
        let caller = serde_json::to_string(&*call.caller).unwrap_or_else(|_| "\"\"".into());
        let _ = write!(out, ",\"caller\":{caller},\"rpc\":\"{}\"", call.rpc);
    }
    if let Some((trace_id, span_id)) = ids {
        // Both ids are lowercase hex: nothing in them needs escaping.
        let _ = write!(
            out,
            ",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\""
        );
    }
    out
}

/// The trace and span ids the OpenTelemetry layer gave `span`; otherwise those of the current
/// OpenTelemetry context: the innermost entered span the layer traces (it makes an entered
/// span's context current, so a span it leaves out shows its parent's ids), or, when spans are
/// not exported, the caller's context attached to the call.
fn ids_of(span: Option<&tracing::span::Id>) -> Option<(TraceId, SpanId)> {
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let cx = span
        .and_then(|span| tracing_opentelemetry::get_otel_context(span, &dispatch))
        .unwrap_or_else(opentelemetry::Context::current);
    let otel = cx.span();
    let sc = otel.span_context();
    sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
}

/// `line` (one JSON object and a newline) with `members` (each with a leading comma, as
/// [`members`] writes them) added as its last members. A line that is not an object ending in
/// `}` is returned as it was.
fn with_members(line: &str, members: &str) -> String {
    if members.is_empty() {
        return line.to_owned();
    }
    let body = line.trim_end();
    let Some(open) = body.strip_suffix('}') else {
        return line.to_owned();
    };
    let members = if open.trim_end().ends_with('{') {
        members.strip_prefix(',').unwrap_or(members)
    } else {
        members
    };
    format!("{open}{members}}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_join_the_object_and_nothing_else_changes() {
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("valid hex");
        let span = SpanId::from_hex("00f067aa0ba902b7").expect("valid hex");
        let ids = Some((trace, span));
        let tail = r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7"}"#;
        let cases = [
            (
                "{\"level\":\"INFO\",\"message\":\"hi\"}\n",
                ids,
                format!("{{\"level\":\"INFO\",\"message\":\"hi\",{tail}\n"),
            ),
            ("{}\n", ids, format!("{{{tail}\n")),
            ("{\"a\":1}", ids, format!("{{\"a\":1,{tail}\n")),
            (
                "{\"level\":\"INFO\"}\n",
                None,
                "{\"level\":\"INFO\"}\n".to_owned(),
            ),
            ("not json\n", ids, "not json\n".to_owned()),
            ("", ids, String::new()),
        ];
        for (line, ids, want) in cases {
            assert_eq!(
                with_members(line, &members(None, ids)),
                want,
                "line {line:?}"
            );
        }
    }

    #[test]
    fn without_an_otel_span_the_ids_are_those_of_the_attached_context() {
        use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("valid hex");
        let span = SpanId::from_hex("00f067aa0ba902b7").expect("valid hex");
        assert_eq!(ids_of(None), None);
        let remote = SpanContext::new(trace, span, TraceFlags::SAMPLED, true, TraceState::NONE);
        let _attached = opentelemetry::Context::new()
            .with_remote_span_context(remote)
            .attach();
        assert_eq!(ids_of(None), Some((trace, span)));
    }

    #[test]
    fn a_span_the_trace_layer_leaves_out_takes_its_parents_ids() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::filter::{LevelFilter, Targets};
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::{Layer, fmt};
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let traces = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_filter(
                Targets::new()
                    .with_target("cis2_session_broker", tracing::Level::INFO)
                    .with_target("elsewhere", LevelFilter::OFF),
            );
        // A log layer that sees every span, including those the trace layer leaves out.
        let logs = fmt::layer().with_writer(std::io::sink);
        let subscriber = tracing_subscriber::registry().with(traces).with(logs);
        tracing::subscriber::with_default(subscriber, || {
            let call = tracing::info_span!("call");
            let _call = call.enter();
            let context = tracing::info_span!(target: "elsewhere", "untraced");
            let _context = context.enter();
            let want = ids_of(call.id().as_ref());
            assert!(want.is_some(), "the call's span has ids");
            assert!(context.id().is_some(), "the untraced span exists");
            assert_eq!(ids_of(context.id().as_ref()), want);
        });
    }

    #[test]
    fn the_result_is_still_one_json_object() {
        let trace = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("valid hex");
        let span = SpanId::from_hex("b7ad6b7169203331").expect("valid hex");
        let line = "{\"fields\":{\"m\":\"}\"},\"x\":\"{\"}\n";
        let call = call::Call {
            caller: "odd \"name\"\\".into(),
            rpc: "GetSession",
        };
        let out = with_members(line, &members(Some(&call), Some((trace, span))));
        let value: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(value["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(value["span_id"], "b7ad6b7169203331");
        assert_eq!(value["caller"], "odd \"name\"\\");
        assert_eq!(value["rpc"], "GetSession");
        assert_eq!(value["x"], "{");
        assert!(out.ends_with("}\n") && out.matches('\n').count() == 1);
    }
}
