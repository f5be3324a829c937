//! The chat page at `/`: `ui/index.html`, plain HTML/CSS/JS embedded at build time (no network
//! at run time), with the model's default system prompt filled in (XGen-Inst: the model card's
//! header; a model's own template: none, so the template's default applies). `--no-ui` turns it
//! off.

use axum::{
    extract::State,
    response::{Html, IntoResponse, Response},
};
use xgen_generate::chat::{ChatFormat, DEFAULT_HEADER};

use crate::state::SharedState;

/// Whether `GET /` serves the chat page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ui {
    On,
    Off,
}

const TEMPLATE: &str = include_str!("ui/index.html");

/// `GET /`.
pub async fn page(State(state): State<SharedState>) -> Response {
    let default = match state.text.chat {
        ChatFormat::XgenInst => DEFAULT_HEADER,
        ChatFormat::Template(_) | ChatFormat::Missing => "",
    };
    let header = serde_json::to_string(default).expect("a string serializes");
    // `</` cannot close the script from inside a JSON string once escaped.
    Html(TEMPLATE.replace("__XGEN_DEFAULT_HEADER__", &header.replace("</", "<\\/"))).into_response()
}
