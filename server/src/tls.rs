//! TLS set-up shared by the upstream HTTP clients.

use std::sync::Once;

/// Installs rustls' `ring` crypto provider as the process default, once.
/// reqwest is built without a provider of its own (to avoid compiling a
/// second crypto library), so this must run before a client is built.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Another component may have installed one already; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
