//! The router: authentication, body limits, and the small endpoints (`/health`, `/metrics`,
//! `/v1/models`, `/apply-template`). Generation endpoints live in `completions.rs`, token
//! accounting (`/tokenize`, `/detokenize`, `/tokenizer_info`) in `tokens.rs`.

use std::sync::atomic::Ordering::Relaxed;

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, DefaultBodyLimit, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};

use crate::{
    api::Fields,
    completions,
    error::ApiError,
    state::SharedState,
    tokens,
    ui::{self, Ui},
};

/// The whole HTTP API.
pub fn app(state: SharedState) -> Router {
    let protected = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokens::tokenize))
        .route("/v1/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/v1/detokenize", post(tokens::detokenize))
        .route("/tokenizer_info", get(tokens::tokenizer_info))
        .route("/apply-template", post(apply_template))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let router = match state.ui {
        Ui::On => Router::new().route("/", get(ui::page)),
        Ui::Off => Router::new(),
    };
    router
        .merge(protected)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(middleware::map_response_with_state(state.clone(), replica_header))
        .with_state(state)
}

/// Names the replica that answered (`--replica-id`), so routing behind a proxy can be seen.
async fn replica_header(State(state): State<SharedState>, mut response: Response) -> Response {
    response.headers_mut().insert("x-xgen-replica", state.replica.clone());
    response
}

/// With `--api-key`, requires `Authorization: Bearer KEY`.
async fn auth(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(key.as_str()) {
            state.metrics.request("auth", 401);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// The request body as JSON, with the limit and syntax errors as OpenAI errors.
pub fn json_body(state: &SharedState, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.body_limit)
        } else {
            ApiError::bad_request(rejection.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn health(State(state): State<SharedState>) -> Response {
    if state.ready.load(Relaxed) {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response()
    }
}

async fn metrics(State(state): State<SharedState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn models(State(state): State<SharedState>) -> Response {
    state.metrics.request("models", 200);
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "xgen", "max_model_len": state.context}],
    }))
    .into_response()
}

/// llama.cpp's `/apply-template`: `{"messages": [...]}` -> `{"prompt": "..."}`, the prompt
/// `/v1/chat/completions` would run for those messages.
async fn apply_template(State(state): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let body = json_body(&state, body)?;
        let prompt = completions::chat_prompt(&state, &Fields::from_body(&body)?)?;
        Ok(json!({"prompt": prompt}))
    })();
    respond(&state, "apply_template", result)
}

/// A JSON result or an error, counted in the metrics.
pub fn respond(state: &SharedState, endpoint: &'static str, result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => {
            state.metrics.request(endpoint, 200);
            Json(v).into_response()
        }
        Err(e) => {
            state.metrics.request(endpoint, e.status.as_u16());
            e.into_response()
        }
    }
}
