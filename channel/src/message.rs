//! The HTTP messages inside the channel: Binary HTTP (RFC 9292, known-length
//! form). A client POSTs the workload's request; the gateway answers 200 with
//! the workload's response, or an HTTP error whose `cloister-error` header
//! carries the code and whose content the reason.

use crate::ChannelError;

/// The header an enclave's refusal inside the channel carries its code in.
pub const ERROR_HEADER: &str = "cloister-error";

/// The client's request: a POST of `body` to `/`.
pub fn post(body: &[u8]) -> Result<Vec<u8>, ChannelError> {
    let mut m = bhttp::Message::request(
        b"POST".to_vec(),
        b"https".to_vec(),
        b"enclave".to_vec(),
        b"/".to_vec(),
    );
    m.put_header("content-type", "application/octet-stream");
    m.write_content(body);
    let mut out = Vec::with_capacity(body.len() + 64);
    m.write_bhttp(bhttp::Mode::KnownLength, &mut out)
        .map_err(|e| ChannelError::Seal(e.to_string()))?;
    Ok(out)
}

/// The workload's response in the gateway's answer, or its refusal.
pub fn response_body(message: &[u8]) -> Result<Vec<u8>, ChannelError> {
    let mut cursor = std::io::Cursor::new(message);
    let parsed = bhttp::Message::read_bhttp(&mut cursor)
        .map_err(|e| ChannelError::Response(format!("not a Binary HTTP response: {e}")))?;
    if !padding_only(message, cursor.position()) {
        return Err(ChannelError::Response(
            "bytes after the Binary HTTP response that are not padding".into(),
        ));
    }
    let status = parsed
        .control()
        .status()
        .ok_or_else(|| ChannelError::Response("a request, not a response".into()))?
        .code();
    if status == 200 {
        return Ok(parsed.content().to_vec());
    }
    let code = parsed
        .header()
        .get(ERROR_HEADER.as_bytes())
        .map_or("E-CHANNEL-REFUSED".into(), |c| {
            String::from_utf8_lossy(c).into_owned()
        });
    Err(ChannelError::Refused {
        status,
        code,
        message: String::from_utf8_lossy(parsed.content()).into_owned(),
    })
}

/// The longest error message an encrypted answer carries.
const MAX_MESSAGE: usize = 4096;

/// The workload's request inside an opened Binary HTTP message (RFC 9292):
/// the content of a POST. Anything else is answered, inside the channel, with
/// an HTTP error.
pub fn request_body(message: &[u8]) -> Result<Vec<u8>, Vec<u8>> {
    let mut cursor = std::io::Cursor::new(message);
    let parsed = bhttp::Message::read_bhttp(&mut cursor).map_err(|e| {
        refusal(
            400,
            "E-CHANNEL-MALFORMED",
            &format!("the opened request is not a Binary HTTP request (RFC 9292): {e}"),
        )
    })?;
    if !padding_only(message, cursor.position()) {
        return Err(refusal(
            400,
            "E-CHANNEL-MALFORMED",
            "the opened request has bytes after its Binary HTTP message that are not padding (zeros)",
        ));
    }
    match parsed.control().method() {
        Some(b"POST") => Ok(parsed.content().to_vec()),
        Some(other) => Err(refusal(
            405,
            "E-CHANNEL-MALFORMED",
            &format!(
                "method {} is not served: POST the workload's request",
                String::from_utf8_lossy(other)
            ),
        )),
        None => Err(refusal(
            400,
            "E-CHANNEL-MALFORMED",
            "the opened message is a response, not a request",
        )),
    }
}

fn message(status: u16, fields: &[(&str, &[u8])], content: &[u8]) -> Vec<u8> {
    let status = bhttp::StatusCode::try_from(status)
        .or_else(|_| bhttp::StatusCode::try_from(500u16))
        .expect("500 is a status code");
    let mut m = bhttp::Message::response(status);
    for (name, value) in fields {
        m.put_header(name.as_bytes(), *value);
    }
    m.write_content(content);
    let mut out = Vec::with_capacity(content.len() + 128 + PAD);
    // Writing to a Vec fails only on a bad field, and ours are fixed.
    let _ = m.write_bhttp(bhttp::Mode::KnownLength, &mut out);
    // Padding (RFC 9292 §3.8) to a multiple of PAD: an answer's length says
    // less about what it holds (success or refusal, which row, which field).
    out.resize(out.len().div_ceil(PAD) * PAD, 0);
    out
}

/// Answers are padded with zeros to a multiple of this many bytes.
pub const PAD: usize = 256;

/// Whether everything after `end` is padding (zeros, RFC 9292 §3.8).
fn padding_only(message: &[u8], end: u64) -> bool {
    usize::try_from(end)
        .ok()
        .and_then(|end| message.get(end..))
        .is_some_and(|rest| rest.iter().all(|b| *b == 0))
}

/// The workload's response as a Binary HTTP 200.
pub fn ok(response: &[u8]) -> Vec<u8> {
    message(
        200,
        &[("content-type", b"application/octet-stream")],
        response,
    )
}

/// A refusal inside the channel: the status, the code in `cloister-error`, and
/// the message (cut to [`MAX_MESSAGE`]) as text. Only the client reads it.
pub fn refusal(status: u16, code: &str, text: &str) -> Vec<u8> {
    let mut end = text.len().min(MAX_MESSAGE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    message(
        status,
        &[
            ("content-type", b"text/plain; charset=utf-8"),
            (ERROR_HEADER, code.as_bytes()),
        ],
        &text.as_bytes()[..end],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opened_message_must_be_one_binary_http_post() {
        let status = |answer: &[u8]| {
            let m = bhttp::Message::read_bhttp(&mut std::io::Cursor::new(answer)).expect("bhttp");
            (
                m.control().status().expect("status").code(),
                m.header().get(b"cloister-error").map(<[u8]>::to_vec),
            )
        };
        let mut get = bhttp::Message::request(
            b"GET".to_vec(),
            b"https".to_vec(),
            b"e".to_vec(),
            b"/".to_vec(),
        );
        get.write_content(b"x");
        let mut bytes = Vec::new();
        get.write_bhttp(bhttp::Mode::KnownLength, &mut bytes)
            .expect("write");
        let refused = request_body(&bytes).expect_err("GET");
        assert_eq!(
            status(&refused),
            (405, Some(b"E-CHANNEL-MALFORMED".to_vec()))
        );
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0; 100]);
        assert_eq!(
            request_body(&padded).map_err(|r| status(&r)),
            Err((405, Some(b"E-CHANNEL-MALFORMED".to_vec()))),
            "padding is no excuse for a GET"
        );
        let mut trailing = bytes.clone();
        trailing.push(7);
        assert_eq!(
            status(&request_body(&trailing).expect_err("trailing")).0,
            400
        );
        assert_eq!(
            status(&request_body(b"\xff\xff").expect_err("garbage")).0,
            400
        );
        assert_eq!(
            status(&request_body(&ok(b"r")).expect_err("a response")).0,
            400
        );
        let long = "é".repeat(MAX_MESSAGE);
        let refusal = refusal(500, "E-PHI-RECORD", &long);
        assert!(
            refusal.len() < MAX_MESSAGE + 200 + PAD,
            "the message is cut"
        );
    }

    #[test]
    fn a_refusal_reaches_the_client_with_its_code_and_reason() {
        match response_body(&refusal(422, "E-PHI-RECORD", "row 1: age is 12")) {
            Err(ChannelError::Refused {
                status,
                code,
                message,
            }) => {
                assert_eq!(
                    (status, code.as_str(), message.as_str()),
                    (422, "E-PHI-RECORD", "row 1: age is 12")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(response_body(&ok(b"score")).expect("ok"), b"score");
        // Answers are padded: a refusal and a success of similar size look alike.
        assert_eq!(ok(b"score").len() % PAD, 0);
        assert_eq!(
            ok(b"score").len(),
            refusal(422, "E-PHI-RECORD", "row 1: age 12 is outside 30..74").len()
        );
        let mut garbage = ok(b"score");
        garbage.push(1);
        assert!(matches!(
            response_body(&garbage),
            Err(ChannelError::Response(_))
        ));
        let mut padded_post = post(b"record").expect("post");
        padded_post.extend_from_slice(&[0; 64]);
        assert_eq!(
            request_body(&padded_post).expect("padded request"),
            b"record"
        );
        let request = post(b"record").expect("post");
        assert_eq!(request_body(&request).expect("body"), b"record");
        assert!(matches!(
            response_body(&request),
            Err(ChannelError::Response(_))
        ));
    }
}
