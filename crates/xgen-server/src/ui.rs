//! The chat page at `/`: `ui/index.html`, plain HTML/CSS/JS embedded at build time (no network
//! at run time), with the XGen-Inst header filled in as its default system prompt. `--no-ui`
//! turns it off.

use std::sync::OnceLock;

use axum::response::{Html, IntoResponse, Response};
use xgen_generate::chat::DEFAULT_HEADER;

/// Whether `GET /` serves the chat page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ui {
    On,
    Off,
}

const TEMPLATE: &str = include_str!("ui/index.html");

/// `GET /`.
pub async fn page() -> Response {
    static PAGE: OnceLock<String> = OnceLock::new();
    let page = PAGE.get_or_init(|| {
        let header = serde_json::to_string(DEFAULT_HEADER).expect("a string serializes");
        // `</` cannot close the script from inside a JSON string once escaped.
        TEMPLATE.replace("__XGEN_DEFAULT_HEADER__", &header.replace("</", "<\\/"))
    });
    Html(page.as_str()).into_response()
}
