//! The read-only status page (`GET /status`). The HTML holds no data and no secret: its
//! script reads the view token from the URL's fragment (`/status#view=TOKEN`, never sent
//! to the server in the request line or a Referer), fetches `GET /api/v1/status` with
//! `Authorization: Bearer TOKEN` every 2 s and renders two tables. Stable ids and data
//! attributes (`tr[data-ps][data-state]`, `tr[data-machine]`) let a test read it.

pub const HTML: &str = include_str!("status.html");
