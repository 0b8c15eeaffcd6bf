"""Schemathesis hooks for server/tests/fuzz.rs: every error answer must be an
OpenAI error body {"error": {"message", "type", "param", "code"}}."""

import schemathesis


@schemathesis.check
def openai_error_body(ctx, response, case):
    if response.status_code < 400:
        return None
    ctype = response.headers.get("content-type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    assert ctype.startswith("application/json"), f"{response.status_code} with content-type {ctype!r}"
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"not an OpenAI error body: {body!r}"
    err = body["error"]
    for key in ("message", "type", "param", "code"):
        assert key in err, f"error body without {key!r}: {body!r}"
    assert isinstance(err["message"], str) and err["message"], f"empty message: {body!r}"
    assert isinstance(err["type"], str), f"type is not a string: {body!r}"
    return None
