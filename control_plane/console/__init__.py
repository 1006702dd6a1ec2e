"""The web console: server-rendered pages (Starlette, Jinja2, htmx) on a replica's own listener
(`--console-listen`).

Theory of operation: the console is a gateway, not a second API. Every page calls the replica's
own gRPC services through the SDK (`gpufed.client.Client`) with the signed-in principal's
token, so authentication, the one authorization table (control_plane.authorization), quotas,
audit and errors are those of the gRPC path, call for call. The browser holds the token in an
HttpOnly, Secure, SameSite=Strict cookie (never in a URL, a page or a log); every write also
carries a CSRF token derived from it (HMAC), checked before the call; every page comes with a
strict Content-Security-Policy (scripts, styles and connections from the console only, no
inline code, no frames). Live views poll small fragments (htmx), so a replica holds no state
per browser: any replica serves any session.
"""
