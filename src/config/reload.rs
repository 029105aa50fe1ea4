//! Live reload of [`super::LiveSettings`] (being built).
