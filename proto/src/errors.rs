//! Why a request failed: one enum per request kind, each mapped to its STUN error code
//! (RFC 8489 §14.8, RFC 8656 §19) here and nowhere else, as rustls maps its errors to alerts.
//! The server writes the error response from these; its [`Response`](crate::server::Response)
//! reports the code.

use crate::peer_policy::PeerDenied;
use crate::stun::ErrorCode;

/// Why the shell could not reserve a relayed transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayError {
    /// No relay address of the requested family is configured (440).
    FamilyNotSupported,
    /// No port is free (508).
    Exhausted,
    /// The RESERVATION-TOKEN is unknown or its reservation expired (508).
    BadReservationToken,
    /// The user holds as many allocations as the user quota allows (486).
    UserQuota,
    /// The server holds as many allocations as the total quota allows (508).
    TotalQuota,
}

/// Failures any request can meet before its method's own checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// A method the server does not implement (400, RFC 8489 §6.3.1).
    UnknownMethod,
    /// Unknown comprehension-required attributes (420 with UNKNOWN-ATTRIBUTES, RFC 8489
    /// §6.3.1).
    UnknownAttributes,
    /// A Binding whose CHANGE-REQUEST is malformed (400, RFC 5780 §7.2).
    MalformedChangeRequest,
    /// A Binding asking for a change of address without a second address configured (420,
    /// RFC 5780 §6.1).
    ChangeRequestUnsupported,
}

impl From<RequestError> for ErrorCode {
    fn from(e: RequestError) -> ErrorCode {
        match e {
            RequestError::UnknownMethod | RequestError::MalformedChangeRequest => ErrorCode::BAD_REQUEST,
            RequestError::UnknownAttributes | RequestError::ChangeRequestUnsupported => ErrorCode::UNKNOWN_ATTRIBUTE,
        }
    }
}

/// Why the long-term credential check failed (RFC 8489 §9.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthError {
    /// No MESSAGE-INTEGRITY(-SHA256): the 401 challenge.
    NoIntegrity,
    /// Integrity without USERNAME/USERHASH, REALM or NONCE, a malformed MESSAGE-INTEGRITY, or
    /// PASSWORD-ALGORITHM(S) that do not match the offer (400).
    Malformed,
    /// The NONCE is not ours for this client transport address, or expired (438).
    StaleNonce,
    /// The REALM is not the server's (401).
    WrongRealm,
    /// Unknown user, wrong password, or an expired REST credential (401).
    BadCredentials,
}

impl From<AuthError> for ErrorCode {
    fn from(e: AuthError) -> ErrorCode {
        match e {
            AuthError::Malformed => ErrorCode::BAD_REQUEST,
            AuthError::StaleNonce => ErrorCode::STALE_NONCE,
            AuthError::NoIntegrity | AuthError::WrongRealm | AuthError::BadCredentials => ErrorCode::UNAUTHENTICATED,
        }
    }
}

/// Why an Allocate failed (RFC 8656 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocateError {
    /// The 5-tuple already has an allocation from another transaction (437).
    AllocationExists,
    /// No REQUESTED-TRANSPORT, or a malformed one (400).
    NoRequestedTransport,
    /// REQUESTED-TRANSPORT names a protocol other than UDP (442).
    UnsupportedTransport,
    /// A malformed EVEN-PORT, REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY,
    /// RESERVATION-TOKEN or LIFETIME (400).
    MalformedAttribute,
    /// Attributes that exclude each other: RESERVATION-TOKEN with EVEN-PORT or a family
    /// attribute, or both family attributes (400).
    ConflictingAttributes,
    /// DONT-FRAGMENT, which this server does not support (420 with UNKNOWN-ATTRIBUTES).
    DontFragment,
    /// The relay allocator refused (440, 486 or 508).
    Relay(RelayError),
    /// The server is draining and names another (300 Try Alternate with ALTERNATE-SERVER,
    /// RFC 8489 §10).
    Draining,
    /// The server is draining and knows no other (403).
    DrainingNoAlternate,
    /// REQUESTED-TRANSPORT TCP on a UDP 5-tuple, or with DONT-FRAGMENT, EVEN-PORT,
    /// RESERVATION-TOKEN or ADDITIONAL-ADDRESS-FAMILY (400, RFC 6062 §5.1).
    BadTcpAllocation,
}

impl From<AllocateError> for ErrorCode {
    fn from(e: AllocateError) -> ErrorCode {
        match e {
            AllocateError::AllocationExists => ErrorCode::ALLOCATION_MISMATCH,
            AllocateError::NoRequestedTransport
            | AllocateError::MalformedAttribute
            | AllocateError::ConflictingAttributes
            | AllocateError::BadTcpAllocation => ErrorCode::BAD_REQUEST,
            AllocateError::UnsupportedTransport => ErrorCode::UNSUPPORTED_TRANSPORT,
            AllocateError::DontFragment => ErrorCode::UNKNOWN_ATTRIBUTE,
            AllocateError::Relay(r) => r.into(),
            AllocateError::Draining => ErrorCode::TRY_ALTERNATE,
            AllocateError::DrainingNoAlternate => ErrorCode::FORBIDDEN,
        }
    }
}

impl From<RelayError> for ErrorCode {
    fn from(e: RelayError) -> ErrorCode {
        match e {
            RelayError::FamilyNotSupported => ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
            RelayError::UserQuota => ErrorCode::ALLOCATION_QUOTA_REACHED,
            RelayError::Exhausted | RelayError::BadReservationToken | RelayError::TotalQuota => {
                ErrorCode::INSUFFICIENT_CAPACITY
            }
        }
    }
}

/// Why a request on an existing allocation (Refresh, CreatePermission, ChannelBind) found
/// none it may use; checked before the method's own errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationError {
    /// No allocation on this 5-tuple (437, RFC 8656 §5).
    NoAllocation,
    /// The allocation belongs to another user (441, RFC 8656 §5).
    WrongCredentials,
}

impl From<AllocationError> for ErrorCode {
    fn from(e: AllocationError) -> ErrorCode {
        match e {
            AllocationError::NoAllocation => ErrorCode::ALLOCATION_MISMATCH,
            AllocationError::WrongCredentials => ErrorCode::WRONG_CREDENTIALS,
        }
    }
}

/// Why a Refresh failed (RFC 8656 §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshError {
    /// A malformed LIFETIME or REQUESTED-ADDRESS-FAMILY (400).
    MalformedAttribute,
    /// REQUESTED-ADDRESS-FAMILY differs from the allocation's (443).
    FamilyMismatch,
}

impl From<RefreshError> for ErrorCode {
    fn from(e: RefreshError) -> ErrorCode {
        match e {
            RefreshError::MalformedAttribute => ErrorCode::BAD_REQUEST,
            RefreshError::FamilyMismatch => ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH,
        }
    }
}

/// Why a peer address is refused for CreatePermission or ChannelBind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerError {
    /// The peer's family differs from the relayed transport address's (443, RFC 8656 §10.2,
    /// §12.2).
    FamilyMismatch,
    /// The peer address policy refuses it (403, RFC 8656 §10.2, §12.2 and §21.2.2).
    Denied(PeerDenied),
}

impl From<PeerError> for ErrorCode {
    fn from(e: PeerError) -> ErrorCode {
        match e {
            PeerError::FamilyMismatch => ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH,
            PeerError::Denied(_) => ErrorCode::FORBIDDEN,
        }
    }
}

/// Why a CreatePermission failed (RFC 8656 §10.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionError {
    /// No XOR-PEER-ADDRESS, or a malformed one (400).
    MalformedPeer,
    /// A peer address is refused; the whole request fails (443, 403).
    Peer(PeerError),
    /// More permissions than the allocation may hold (508).
    TooManyPermissions,
}

impl From<PermissionError> for ErrorCode {
    fn from(e: PermissionError) -> ErrorCode {
        match e {
            PermissionError::MalformedPeer => ErrorCode::BAD_REQUEST,
            PermissionError::Peer(p) => p.into(),
            PermissionError::TooManyPermissions => ErrorCode::INSUFFICIENT_CAPACITY,
        }
    }
}

/// Why a ChannelBind failed (RFC 8656 §12.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBindError {
    /// No CHANNEL-NUMBER or XOR-PEER-ADDRESS, a malformed one, or a channel number out of
    /// range (400).
    Malformed,
    /// The number is bound to another peer or the peer to another number (400).
    Conflict,
    /// The peer address is refused (443, 403).
    Peer(PeerError),
    /// More channels or permissions than the allocation may hold (508).
    TooManyChannels,
}

impl From<ChannelBindError> for ErrorCode {
    fn from(e: ChannelBindError) -> ErrorCode {
        match e {
            ChannelBindError::Malformed | ChannelBindError::Conflict => ErrorCode::BAD_REQUEST,
            ChannelBindError::Peer(p) => p.into(),
            ChannelBindError::TooManyChannels => ErrorCode::INSUFFICIENT_CAPACITY,
        }
    }
}

/// Why a Connect failed (RFC 6062 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// The allocation is not a TCP allocation, or no valid XOR-PEER-ADDRESS (400).
    BadRequest,
    /// The peer is refused (443 family mismatch, 403 by policy).
    Peer(PeerError),
    /// A connection to this peer is being made or exists for this allocation (446).
    AlreadyExists,
    /// More peer connections than an allocation may hold (403, "the capacity or policy of
    /// the server").
    TooManyConnections,
    /// The TCP connection to the peer failed or timed out (447).
    Failed,
}

impl From<ConnectError> for ErrorCode {
    fn from(e: ConnectError) -> ErrorCode {
        match e {
            ConnectError::BadRequest => ErrorCode::BAD_REQUEST,
            ConnectError::Peer(p) => p.into(),
            ConnectError::AlreadyExists => ErrorCode::CONNECTION_ALREADY_EXISTS,
            ConnectError::TooManyConnections => ErrorCode::FORBIDDEN,
            ConnectError::Failed => ErrorCode::CONNECTION_TIMEOUT_OR_FAILURE,
        }
    }
}

/// Why a ConnectionBind failed (RFC 6062 §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionBindError {
    /// Not on a TCP or TLS connection, on a connection that holds an allocation, without
    /// CONNECTION-ID, or for a connection that is not pending (400).
    BadRequest,
    /// The connection belongs to another user's allocation (441).
    WrongCredentials,
}

impl From<ConnectionBindError> for ErrorCode {
    fn from(e: ConnectionBindError) -> ErrorCode {
        match e {
            ConnectionBindError::BadRequest => ErrorCode::BAD_REQUEST,
            ConnectionBindError::WrongCredentials => ErrorCode::WRONG_CREDENTIALS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole mapping, as a table a reader can check against RFC 8656 §19.
    #[test]
    fn codes() {
        let cases: Vec<(ErrorCode, u16)> = vec![
            (RequestError::UnknownMethod.into(), 400),
            (RequestError::UnknownAttributes.into(), 420),
            (RequestError::MalformedChangeRequest.into(), 400),
            (RequestError::ChangeRequestUnsupported.into(), 420),
            (AuthError::NoIntegrity.into(), 401),
            (AuthError::Malformed.into(), 400),
            (AuthError::StaleNonce.into(), 438),
            (AuthError::WrongRealm.into(), 401),
            (AuthError::BadCredentials.into(), 401),
            (AllocateError::AllocationExists.into(), 437),
            (AllocateError::NoRequestedTransport.into(), 400),
            (AllocateError::UnsupportedTransport.into(), 442),
            (AllocateError::MalformedAttribute.into(), 400),
            (AllocateError::ConflictingAttributes.into(), 400),
            (AllocateError::DontFragment.into(), 420),
            (AllocateError::Draining.into(), 300),
            (AllocateError::DrainingNoAlternate.into(), 403),
            (AllocateError::Relay(RelayError::FamilyNotSupported).into(), 440),
            (AllocateError::Relay(RelayError::UserQuota).into(), 486),
            (AllocateError::Relay(RelayError::TotalQuota).into(), 508),
            (AllocateError::Relay(RelayError::Exhausted).into(), 508),
            (AllocateError::Relay(RelayError::BadReservationToken).into(), 508),
            (RefreshError::MalformedAttribute.into(), 400),
            (AllocationError::NoAllocation.into(), 437),
            (AllocationError::WrongCredentials.into(), 441),
            (RefreshError::FamilyMismatch.into(), 443),
            (PermissionError::MalformedPeer.into(), 400),
            (PermissionError::Peer(PeerError::FamilyMismatch).into(), 443),
            (
                PermissionError::Peer(PeerError::Denied(PeerDenied::SpecialPurpose)).into(),
                403,
            ),
            (PermissionError::TooManyPermissions.into(), 508),
            (ChannelBindError::Malformed.into(), 400),
            (ChannelBindError::Conflict.into(), 400),
            (
                ChannelBindError::Peer(PeerError::Denied(PeerDenied::OwnListener)).into(),
                403,
            ),
            (ChannelBindError::TooManyChannels.into(), 508),
            (AllocateError::BadTcpAllocation.into(), 400),
            (ConnectError::BadRequest.into(), 400),
            (ConnectError::Peer(PeerError::FamilyMismatch).into(), 443),
            (ConnectError::AlreadyExists.into(), 446),
            (ConnectError::TooManyConnections.into(), 403),
            (ConnectError::Failed.into(), 447),
            (ConnectionBindError::BadRequest.into(), 400),
            (ConnectionBindError::WrongCredentials.into(), 441),
        ];
        for (got, want) in cases {
            assert_eq!(got.0, want);
        }
    }
}
