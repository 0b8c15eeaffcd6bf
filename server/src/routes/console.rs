//! `GET /console`: a small web console (chat playground, learning charts,
//! experience libraries, KV and load) served from files embedded in the
//! binary. Plain HTML, CSS and JavaScript, no build step and no CDN; the page
//! only calls ouro's public HTTP API (the admin key and API key it is given
//! stay in the browser's sessionStorage).

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::errors::ApiError;

/// The embedded files: name, content type, body.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("../../console/index.html")),
    ("console.js", "text/javascript; charset=utf-8", include_str!("../../console/console.js")),
    ("console.css", "text/css; charset=utf-8", include_str!("../../console/console.css")),
];

fn serve(name: &str) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ctype, body)) => ([(header::CONTENT_TYPE, *ctype), (header::CACHE_CONTROL, "no-cache")], *body).into_response(),
        None => ApiError::NotFound(format!("no console file {name}")).into_response(),
    }
}

/// `GET /console`: the page.
pub async fn index() -> Response {
    serve("index.html")
}

/// `GET /console/{file}`: its script and style sheet.
pub async fn file(Path(name): Path<String>) -> Response {
    serve(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_is_referenced_by_the_page() {
        let html = FILES[0].2;
        for (name, _, body) in &FILES[1..] {
            assert!(html.contains(&format!("/console/{name}")), "{name} is not linked from index.html");
            assert!(!body.is_empty());
        }
        assert!(!html.contains("http://") && !html.contains("https://"), "the console must not load anything from elsewhere");
    }
}
