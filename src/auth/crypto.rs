//! JWT signature checks on `ring`, the library rustls already links: `jsonwebtoken` parses
//! and validates tokens, and this provider does its arithmetic. wsgate only verifies, so
//! the provider cannot sign.

use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind, Result};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature as ring_sig;

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes the ring provider `jsonwebtoken`'s process-wide one. Idempotent; called before any
/// route with `jwt` is built.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only fails when a provider is installed already, which can only be this one.
        let _ = PROVIDER.install_default();
    });
}

fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    Err(Error::from(ErrorKind::InvalidAlgorithm))
}

/// How one algorithm's signature is checked.
#[derive(Clone, Copy)]
enum Check {
    Hmac(ring::hmac::Algorithm),
    Rsa(&'static ring_sig::RsaParameters),
    /// ECDSA and Ed25519: the key is the raw public point / bytes.
    Raw(&'static dyn ring_sig::VerificationAlgorithm),
}

fn check_for(alg: Algorithm) -> Option<Check> {
    Some(match alg {
        Algorithm::HS256 => Check::Hmac(ring::hmac::HMAC_SHA256),
        Algorithm::HS384 => Check::Hmac(ring::hmac::HMAC_SHA384),
        Algorithm::HS512 => Check::Hmac(ring::hmac::HMAC_SHA512),
        Algorithm::RS256 => Check::Rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => Check::Rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => Check::Rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => Check::Rsa(&ring_sig::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => Check::Rsa(&ring_sig::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => Check::Rsa(&ring_sig::RSA_PSS_2048_8192_SHA512),
        Algorithm::ES256 => Check::Raw(&ring_sig::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => Check::Raw(&ring_sig::ECDSA_P384_SHA384_FIXED),
        Algorithm::EdDSA => Check::Raw(&ring_sig::ED25519),
        _ => return None,
    })
}

/// One key, ready to check signatures of one algorithm.
struct RingVerifier {
    alg: Algorithm,
    check: Check,
    key: DecodingKeyKind,
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    // The family check is what keeps an RSA public key from being used as an HMAC secret.
    if key.family() != alg.family() || key.family() == AlgorithmFamily::Ed && key_len(key) != 32 {
        return Err(Error::from(ErrorKind::InvalidKeyFormat));
    }
    let check = check_for(*alg).ok_or_else(|| Error::from(ErrorKind::InvalidAlgorithm))?;
    Ok(Box::new(RingVerifier {
        alg: *alg,
        check,
        key: key.kind().clone(),
    }))
}

fn key_len(key: &DecodingKey) -> usize {
    key.try_get_as_bytes().map_or(0, <[u8]>::len)
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        let ok = match (&self.check, &self.key) {
            (Check::Hmac(alg), DecodingKeyKind::SecretOrDer(secret)) => {
                ring::hmac::verify(&ring::hmac::Key::new(*alg, secret), msg, sig).is_ok()
            }
            (Check::Rsa(params), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                ring_sig::RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            (Check::Rsa(params), DecodingKeyKind::SecretOrDer(der)) => {
                ring_sig::UnparsedPublicKey::new(*params, der)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Check::Raw(alg), DecodingKeyKind::SecretOrDer(raw)) => {
                ring_sig::UnparsedPublicKey::new(*alg, raw)
                    .verify(msg, sig)
                    .is_ok()
            }
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(signature::Error::new())
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}
