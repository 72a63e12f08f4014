//! Who may read the page and `/metrics`: the coordinator's **user** tokens ([`Tokens`], checked
//! in constant time as for gRPC), when it has tokens; everyone when it has none.
//!
//! A token is accepted from an `Authorization: Bearer TOKEN` header, from the `prunesweep_token`
//! cookie, or once from `?token=TOKEN`: that reply sets the cookie (HttpOnly, SameSite=Strict,
//! path `/`) and redirects to the same URL without the token, so it does not stay in the address
//! bar or the browser history. A worker token is refused (403): workers have no business here.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use tonic::metadata::MetadataMap;

use crate::auth::{Role, Tokens};

/// The cookie holding the token.
pub const COOKIE: &str = "prunesweep_token";

/// What [`check`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Go on.
    Granted,
    /// A valid `?token=`: set this cookie value and redirect to the URL without it.
    Login {
        /// The percent-encoded token.
        cookie: String,
    },
    /// Refused, with why (for the reply).
    Refused {
        /// 401 (no token, or an unknown one) or 403 (a worker token).
        status: StatusCode,
        /// What to do about it.
        why: String,
    },
}

/// Checks one token for the user role; `Err` is [`Access::Refused`].
fn check_token(tokens: &Tokens, token: &str) -> Result<(), Access> {
    let mut metadata = MetadataMap::new();
    let refused = |status, why: String| Access::Refused { status, why };
    let Ok(value) = format!("Bearer {token}").parse() else {
        return Err(refused(StatusCode::UNAUTHORIZED, "the token was not accepted".into()));
    };
    metadata.insert("authorization", value);
    tokens.check(Role::User, &metadata).map_err(|status| match status.code() {
        tonic::Code::PermissionDenied => refused(
            StatusCode::FORBIDDEN,
            "a worker token cannot read the page or the metrics: use a user token".into(),
        ),
        _ => refused(StatusCode::UNAUTHORIZED, "the token was not accepted".into()),
    })
}

/// Decides whether a request with these `headers` and `query` pairs may be answered.
pub fn check(tokens: &Tokens, headers: &HeaderMap, query: &[(String, String)]) -> Access {
    if !tokens.enabled() {
        return Access::Granted;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    if let Some(token) = bearer {
        return check_token(tokens, token.trim()).err().unwrap_or(Access::Granted);
    }
    if let Some((_, token)) = query.iter().find(|(k, _)| k == "token") {
        return match check_token(tokens, token) {
            Ok(()) => Access::Login { cookie: percent_encode(token) },
            Err(refused) => refused,
        };
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v);
    if let Some(token) = cookie {
        return match percent_decode(token) {
            Some(token) => check_token(tokens, &token).err().unwrap_or(Access::Granted),
            None => Access::Refused { status: StatusCode::UNAUTHORIZED, why: "the token was not accepted".into() },
        };
    }
    Access::Refused {
        status: StatusCode::UNAUTHORIZED,
        why: "this coordinator needs a user token: open the page with ?token=TOKEN once (it is kept in a cookie), \
              or send Authorization: Bearer TOKEN"
            .into(),
    }
}

/// The redirect that stores the token in the cookie and drops `token` from the URL.
pub fn login_redirect(path: &str, query: &[(String, String)], cookie: &str) -> Response<Full<Bytes>> {
    let rest: Vec<String> = query
        .iter()
        .filter(|(k, _)| k != "token")
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect();
    let location = if rest.is_empty() { path.to_string() } else { format!("{path}?{}", rest.join("&")) };
    let mut response = super::text(StatusCode::SEE_OTHER, "token accepted\n");
    let headers = response.headers_mut();
    // `path` is the request's own (ASCII, validated by hyper) and the rest is percent-encoded.
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    let set = format!("{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict");
    if let Ok(set) = HeaderValue::from_str(&set) {
        headers.insert(header::SET_COOKIE, set);
    }
    response
}

/// Adds `WWW-Authenticate: Bearer` to a refusal.
pub fn challenge(response: &mut Response<Full<Bytes>>) {
    if response.status() == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"prunesweep\""));
    }
}

/// `s` with every byte outside `A-Z a-z 0-9 - . _ ~` as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` sequences decoded; `None` for a broken escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `a=1&b=x%20y` → `[("a", "1"), ("b", "x y")]` (`+` is a space; pairs that do not decode are
/// left out).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(&k.replace('+', " "))?, percent_decode(&v.replace('+', " "))?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn without_tokens_everything_passes() {
        assert_eq!(check(&Tokens::none(), &HeaderMap::new(), &[]), Access::Granted);
    }

    #[test]
    fn bearer_cookie_and_query_tokens() {
        let t = Tokens::new(&["u s;er"], &["w1"]);
        let status = |a: Access| match a {
            Access::Refused { status, .. } => status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(check(&t, &HeaderMap::new(), &[])), StatusCode::UNAUTHORIZED);
        assert_eq!(check(&t, &headers(&[("authorization", "Bearer u s;er")]), &[]), Access::Granted);
        assert_eq!(status(check(&t, &headers(&[("authorization", "Bearer w1")]), &[])), StatusCode::FORBIDDEN);
        assert_eq!(status(check(&t, &headers(&[("authorization", "Bearer nope")]), &[])), StatusCode::UNAUTHORIZED);
        // The query logs in: the cookie holds the token percent-encoded, and reads back.
        let q = query_pairs("known=1&token=u+s%3Ber");
        let Access::Login { cookie } = check(&t, &HeaderMap::new(), &q) else { panic!() };
        assert_eq!(cookie, "u%20s%3Ber");
        let with_cookie = headers(&[("cookie", &format!("a=b; {COOKIE}={cookie}"))]);
        assert_eq!(check(&t, &with_cookie, &[]), Access::Granted);
        let bad_cookie = headers(&[("cookie", &format!("{COOKIE}=nope"))]);
        assert_eq!(status(check(&t, &bad_cookie, &[])), StatusCode::UNAUTHORIZED);
        assert_eq!(status(check(&t, &HeaderMap::new(), &query_pairs("token=w1"))), StatusCode::FORBIDDEN);
        // A token that cannot be a header value is refused, not a panic.
        assert_eq!(status(check(&t, &HeaderMap::new(), &query_pairs("token=%0A"))), StatusCode::UNAUTHORIZED);
        let r = login_redirect("/sweeps/tiny", &q, &cookie);
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/sweeps/tiny?known=1");
        let set = r.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(set.starts_with("prunesweep_token=u%20s%3Ber;") && set.contains("HttpOnly"), "{set}");
    }

    #[test]
    fn percent_coding_round_trips_and_rejects_broken_escapes() {
        for s in ["", "tiny", "a b/c?d=e&f", "é<>\"'"] {
            assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%G0"), None);
        assert_eq!(percent_decode("%+1"), None, "a sign is no hex digit");
        assert_eq!(percent_decode("%C3"), None, "not UTF-8");
        assert_eq!(
            query_pairs("a&b=&c=1%202"),
            vec![("a".into(), "".into()), ("b".into(), "".into()), ("c".into(), "1 2".into())]
        );
    }
}
