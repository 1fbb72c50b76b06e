//! Text log lines (dev mode): tracing-subscriber's full format, ending with the `caller` and
//! `rpc` of the call the line was logged in ([`super::call`]), when there is one.

use super::call;
use std::fmt;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, FormatFields, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::registry::LookupSpan;

pub(super) struct TextWithCall {
    /// The format is asked for colours or none explicitly: the line is written into a string
    /// first, and a string's writer has none.
    coloured: Format<Full>,
    plain: Format<Full>,
}

impl TextWithCall {
    pub(super) fn new() -> Self {
        let format = Format::default().with_target(false);
        TextWithCall {
            coloured: format.clone().with_ansi(true),
            plain: format.with_ansi(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for TextWithCall
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let format = if writer.has_ansi_escapes() {
            &self.coloured
        } else {
            &self.plain
        };
        let Some(call) = call::current() else {
            return format.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        format.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        writeln!(writer, "{body} caller={} rpc={}", call.caller, call.rpc)
    }
}
