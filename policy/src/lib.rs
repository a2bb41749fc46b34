//! Pure decisions: who may connect, who is trusted, which settings a client may use.
