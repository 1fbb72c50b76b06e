//! The simulator's HTML: the sign-in page (pick a test user and an authenticator), the error
//! page (bad client or redirect URI, which must never redirect), and the signed-out page.
//!
//! Every value that came from a request, and every table value, goes through [`escape`]: the
//! request is echoed back in hidden fields, and a hostile `state` must not become markup.

use super::users::{AcrClass, Authenticator, SimUser, USERS};
use std::fmt::Write;

/// What the sign-in page needs to know about the request being answered.
pub(crate) struct SignInView<'a> {
    /// Where the buttons post to.
    pub action: &'a str,
    /// The original authorization request, carried through in hidden fields.
    pub request: &'a [(String, String)],
    pub client_id: &'a str,
    pub acr: AcrClass,
    /// `selectedrole` was asked for: users with several roles get a role picker.
    pub select_role: bool,
}

/// `&`, `<`, `>`, `"` and `'` as character references: the broker's one HTML escaping.
pub(crate) use crate::http::escape_html as escape;

pub(crate) fn sign_in(view: &SignInView<'_>) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Sign in to CIS2</h1>\n<p class=\"lead\">Service <code>{}</code> asks for \
         <strong>{}</strong>: {}. Choose a test user and how they sign in.</p>\n",
        escape(view.client_id),
        view.acr.as_str(),
        acr_words(view.acr),
    );
    for user in USERS {
        body.push_str(&user_card(view, user));
    }
    layout("Sign in - CIS2 simulator", &body)
}

pub(crate) fn error(title: &str, message: &str) -> String {
    let body = format!(
        "<h1>{}</h1>\n<p class=\"error\" id=\"error-message\">{}</p>\n\
         <p>The sign-in cannot continue, and you have not been sent back to the service.</p>\n",
        escape(title),
        escape(message)
    );
    layout(&format!("{title} - CIS2 simulator"), &body)
}

pub(crate) fn signed_out() -> String {
    layout(
        "Signed out - CIS2 simulator",
        "<h1 id=\"signed-out\">You have signed out</h1>\n\
         <p>Your CIS2 session has ended. You can close this window.</p>\n",
    )
}

fn acr_words(acr: AcrClass) -> &'static str {
    match acr {
        AcrClass::Aal3Any => "a smartcard, security key or iPad app",
        AcrClass::Aal2OrAal3Any => "any authenticator except a password",
    }
}

fn user_card(view: &SignInView<'_>, user: &SimUser) -> String {
    let uid = escape(user.uid);
    let mut card = String::new();
    let _ = write!(
        card,
        "<section class=\"user\" id=\"user-{uid}\" data-uid=\"{uid}\">\n\
         <h2>{} <span class=\"uid\">{uid}</span></h2>\n<p class=\"note\">{}</p>\n",
        escape(&user.display_name()),
        escape(user.note),
    );
    card.push_str(&roles_list(user));
    let _ = writeln!(
        card,
        "<form method=\"post\" action=\"{}\">",
        escape(view.action)
    );
    for (name, value) in view.request {
        let _ = writeln!(
            card,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            escape(name),
            escape(value)
        );
    }
    let _ = writeln!(
        card,
        "<input type=\"hidden\" name=\"login_hint\" value=\"{uid}\">"
    );
    if view.select_role && user.roles.len() > 1 {
        card.push_str(&role_picker(user));
    }
    card.push_str("<div class=\"authenticators\">\n");
    for authenticator in user.authenticators {
        card.push_str(&authenticator_button(user, authenticator, view.acr));
    }
    card.push_str("</div>\n</form>\n</section>\n");
    card
}

fn roles_list(user: &SimUser) -> String {
    if user.roles.is_empty() {
        return "<p class=\"roles none\">No role</p>\n".to_string();
    }
    let mut list = String::from("<ul class=\"roles\">\n");
    for role in user.roles {
        let _ = writeln!(
            list,
            "<li>{} <code>{}</code> at {} ({}) <span class=\"roleid\">role id {}</span></li>",
            escape(role.role_name),
            escape(role.role_code),
            escape(role.org_name),
            escape(role.org_code),
            escape(role.person_roleid),
        );
    }
    list.push_str("</ul>\n");
    list
}

fn role_picker(user: &SimUser) -> String {
    let uid = escape(user.uid);
    let mut picker = format!(
        "<label for=\"role-{uid}\">Role for this session</label>\n\
         <select id=\"role-{uid}\" name=\"sim_role\" data-uid=\"{uid}\">\n"
    );
    for role in user.roles {
        let _ = writeln!(
            picker,
            "<option value=\"{}\">{} at {}</option>",
            escape(role.person_roleid),
            escape(role.role_name),
            escape(role.org_name),
        );
    }
    picker.push_str("</select>\n");
    picker
}

fn authenticator_button(user: &SimUser, authenticator: &Authenticator, acr: AcrClass) -> String {
    let uid = escape(user.uid);
    let amr = escape(authenticator.amr);
    let label = escape(authenticator.label);
    let aal = authenticator.aal;
    if acr.allows(authenticator) {
        format!(
            "<button type=\"submit\" class=\"signin\" name=\"sim_authenticator\" value=\"{amr}\" \
             id=\"signin-{uid}-{amr}\" data-uid=\"{uid}\" data-amr=\"{amr}\">{label} \
             <span class=\"aal\">{aal}</span></button>\n"
        )
    } else {
        format!(
            "<span class=\"refused\"><button type=\"button\" class=\"signin\" disabled \
             id=\"signin-{uid}-{amr}\" data-uid=\"{uid}\" data-amr=\"{amr}\">{label} \
             <span class=\"aal\">{aal}</span></button> <span class=\"reason\">not accepted: \
             this sign-in needs {}</span></span>\n",
            acr_needs(acr)
        )
    }
}

fn acr_needs(acr: AcrClass) -> &'static str {
    match acr {
        AcrClass::Aal3Any => "AAL3",
        AcrClass::Aal2OrAal3Any => "AAL2 or AAL3",
    }
}

const STYLE: &str = "\
body{margin:0;font-family:Arial,Helvetica,sans-serif;font-size:17px;line-height:1.5;\
color:#212b32;background:#f0f4f5}\
header{background:#005eb8;color:#fff;padding:14px 24px;font-weight:bold;font-size:20px}\
header span{font-weight:normal;font-size:15px;margin-left:12px;opacity:.9}\
main{max-width:960px;margin:0 auto;padding:24px}\
h1{font-size:32px;margin:8px 0 12px}h2{font-size:22px;margin:0 0 4px}\
.lead{font-size:19px}.uid,.roleid{color:#4c6272;font-weight:normal;font-size:15px}\
.user{background:#fff;border-left:6px solid #005eb8;padding:16px 20px;margin:16px 0}\
.note{margin:0 0 8px;color:#4c6272}.roles{margin:0 0 12px;padding-left:20px}\
code{background:#f0f4f5;padding:0 4px}\
label{display:block;font-weight:bold;margin:8px 0 4px}\
select{font-size:16px;padding:6px;margin-bottom:12px;max-width:100%}\
.authenticators{display:flex;flex-wrap:wrap;gap:10px;align-items:center}\
button.signin{font-size:17px;font-weight:bold;padding:10px 16px;border:0;border-radius:4px;\
background:#007f3b;color:#fff;cursor:pointer;box-shadow:0 4px 0 #00401e}\
button.signin:focus{outline:4px solid #ffeb3b}\
button.signin[disabled]{background:#d8dde0;color:#4c6272;cursor:not-allowed;box-shadow:none}\
.aal{font-weight:normal;font-size:14px;margin-left:6px}\
.reason{font-size:15px;color:#4c6272}.refused{display:inline-flex;gap:8px;align-items:center}\
.error{border-left:6px solid #d5281b;background:#fff;padding:12px 16px}\
footer{max-width:960px;margin:0 auto;padding:0 24px 24px;color:#4c6272;font-size:15px}";

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <header>NHS Care Identity Service 2 <span>simulator: test users only</span></header>\n\
         <main>\n{body}</main>\n\
         <footer>This is a simulator for development and tests. It is not NHS CIS2.</footer>\n\
         </body>\n</html>\n",
        escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        request: &'a [(String, String)],
        acr: AcrClass,
        select_role: bool,
    ) -> SignInView<'a> {
        SignInView {
            action: "/authorize/select",
            request,
            client_id: "broker",
            acr,
            select_role,
        }
    }

    #[test]
    fn escapes_markup_characters() {
        let cases = [
            ("plain", "plain"),
            ("<script>", "&lt;script&gt;"),
            ("a&b", "a&amp;b"),
            ("\"'", "&quot;&#39;"),
            (
                "\"><img src=x onerror=alert(1)>",
                "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;",
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(escape(raw), want);
        }
    }

    #[test]
    fn lists_every_user_with_buttons_for_allowed_authenticators_only() {
        let html = sign_in(&view(&[], AcrClass::Aal3Any, false));
        for user in USERS {
            assert!(
                html.contains(&format!("data-uid=\"{}\"", user.uid)),
                "{}",
                user.uid
            );
        }
        assert!(html.contains("Liam O&#39;Neill"));
        assert!(html.contains("Guy&#39;s and St Thomas&#39;"));
        // The step-up user: smartcard enabled, passkey disabled at AAL3_ANY.
        let smartcard = "id=\"signin-656005750107-N3_SMARTCARD\"";
        let passkey = "disabled id=\"signin-656005750107-PASSKEY\"";
        assert!(html.contains(smartcard));
        assert!(!html.contains(&format!("disabled {smartcard}")));
        assert!(html.contains(passkey));

        let html = sign_in(&view(&[], AcrClass::Aal2OrAal3Any, false));
        assert!(!html.contains("disabled id=\"signin-656005750107-PASSKEY\""));
        assert!(html.contains("disabled id=\"signin-656005750110-PWD\""));
    }

    #[test]
    fn role_picker_only_when_asked_and_useful() {
        let html = sign_in(&view(&[], AcrClass::Aal3Any, true));
        assert!(html.contains("id=\"role-656005750104\""));
        assert!(!html.contains("id=\"role-656005750108\""));
        let html = sign_in(&view(&[], AcrClass::Aal3Any, false));
        assert!(!html.contains("name=\"sim_role\""));
    }

    #[test]
    fn echoed_request_values_are_escaped() {
        let request = vec![(
            "state".to_string(),
            "\"><script>alert(1)</script>".to_string(),
        )];
        let html = sign_in(&view(&request, AcrClass::Aal3Any, false));
        assert!(!html.contains("<script>"));
        assert!(html.contains("value=\"&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""));
        let html = error("Bad <b>", "client <i>x</i>");
        assert!(!html.contains("<b>") && !html.contains("<i>"));
    }
}
