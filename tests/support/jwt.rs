//! Signing keys the tests make, and tokens signed with them: RSA (made by `openssl`, which
//! `.ci/run` installs: ring verifies RSA but cannot generate keys), ECDSA P-256 and Ed25519
//! (made by ring), and HMAC secrets.

#![allow(dead_code)]

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    RSA_PKCS1_SHA256,
};
use serde_json::{json, Value};

enum Kind {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Hmac(ring::hmac::Key),
}

/// One signing key with its `kid` and JWT algorithm.
pub struct Signer {
    pub kid: String,
    pub alg: &'static str,
    kind: Kind,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

impl Signer {
    /// A new RSA-2048 key (RS256).
    pub fn rsa(kid: &str) -> Signer {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("openssl is needed to make RSA test keys (apt-get install openssl)");
        assert!(out.status.success(), "openssl genpkey failed: {out:?}");
        // OpenSSL 3.0 writes PKCS#1 here, later versions PKCS#8.
        let pair = RsaKeyPair::from_der(&out.stdout)
            .or_else(|_| RsaKeyPair::from_pkcs8(&out.stdout))
            .expect("openssl made an RSA key");
        Signer {
            kid: kid.to_string(),
            alg: "RS256",
            kind: Kind::Rsa(pair),
        }
    }

    /// A new ECDSA P-256 key (ES256).
    pub fn ec(kid: &str) -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate a P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("load the P-256 key");
        Signer {
            kid: kid.to_string(),
            alg: "ES256",
            kind: Kind::Ec(pair),
        }
    }

    /// A new Ed25519 key (EdDSA).
    pub fn ed(kid: &str) -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("generate an Ed25519 key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("load the Ed25519 key");
        Signer {
            kid: kid.to_string(),
            alg: "EdDSA",
            kind: Kind::Ed(pair),
        }
    }

    /// An HS256 signer with `secret`.
    pub fn hmac(secret: &[u8]) -> Signer {
        Signer {
            kid: String::new(),
            alg: "HS256",
            kind: Kind::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)),
        }
    }

    /// The public key as a JWK (with `kid` and `alg`).
    pub fn jwk(&self) -> Value {
        match &self.kind {
            Kind::Rsa(pair) => {
                let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
                let trim = |b: &[u8]| b[b.iter().take_while(|x| **x == 0).count()..].to_vec();
                let (n, e) = (trim(&public.n), trim(&public.e));
                json!({"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig", "n": b64(&n), "e": b64(&e)})
            }
            Kind::Ec(pair) => {
                // Uncompressed point: 0x04 || x || y.
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "kid": self.kid, "alg": "ES256", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
            Kind::Ed(pair) => {
                json!({"kty": "OKP", "kid": self.kid, "alg": "EdDSA", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
            Kind::Hmac(_) => panic!("an HMAC secret has no public JWK"),
        }
    }

    /// The RSA public key in DER (PKCS#1), for the "HS256 signed with the public key" attack.
    pub fn rsa_public_der(&self) -> Vec<u8> {
        match &self.kind {
            Kind::Rsa(pair) => pair.public().as_ref().to_vec(),
            _ => panic!("not an RSA key"),
        }
    }

    /// A token with the standard header (`alg`, `typ`, and `kid` when the key has one).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = json!({"alg": self.alg, "typ": "JWT"});
        if !self.kid.is_empty() {
            header["kid"] = json!(self.kid);
        }
        self.sign_with_header(&header, claims)
    }

    /// A token with this exact header, signed with this key.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self.raw_sign(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }

    fn raw_sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.kind {
            Kind::Rsa(pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .expect("RSA signing");
                sig
            }
            Kind::Ec(pair) => pair
                .sign(&rng, message)
                .expect("ECDSA signing")
                .as_ref()
                .to_vec(),
            Kind::Ed(pair) => pair.sign(message).as_ref().to_vec(),
            Kind::Hmac(key) => ring::hmac::sign(key, message).as_ref().to_vec(),
        }
    }
}

/// An HS256 token signed with raw `secret` bytes (any secret, e.g. a public key's DER).
pub fn hs256_with(secret: &[u8], header: &Value, claims: &Value) -> String {
    Signer::hmac(secret).sign_with_header(header, claims)
}

/// A JWKS document holding the public keys of `signers`.
pub fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}
