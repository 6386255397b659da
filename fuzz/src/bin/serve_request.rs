//! The server's request parser: `/v1/chat/completions` and `/v1/completions` bodies as
//! `hone serve` receives them, and the stop filter that streams an answer, fed the request's
//! own text in pieces of one to five bytes (as tokens arrive). Checked: what the filter shows is
//! a prefix of the text, the whole text when no stop sequence occurs in it, and otherwise ends
//! where a stop sequence begins.
use hone::serve::api::{chat_request, completion_request, StopFilter};

fn run(data: &[u8]) {
    for parsed in [chat_request(data), completion_request(data)] {
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                let _ = e.body();
                continue;
            }
        };
        let text = req.prompt_record.as_str();
        let mut filter = StopFilter::new(req.stop.clone());
        let (mut shown, mut hit, mut rest, mut n) = (String::new(), false, text, 1);
        while !rest.is_empty() && !hit {
            let mut cut = n.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            let (piece, tail) = rest.split_at(cut);
            let (out, h) = filter.push(piece);
            shown.push_str(&out);
            (hit, rest, n) = (h, tail, n % 5 + 1);
        }
        if !hit {
            shown.push_str(&filter.finish());
        }
        assert!(
            text.starts_with(&shown),
            "the filter showed text that was not given"
        );
        let occurs = req.stop.iter().any(|s| text.contains(s.as_str()));
        assert_eq!(hit, occurs, "a stop sequence was missed or made up");
        if hit {
            let after = &text[shown.len()..];
            assert!(
                req.stop.iter().any(|s| after.starts_with(s.as_str())),
                "the answer was cut where no stop sequence begins"
            );
        } else {
            assert_eq!(shown, text, "text was held back at the end");
        }
    }
}

fn main() {
    hone_fuzz::drive(run);
}
