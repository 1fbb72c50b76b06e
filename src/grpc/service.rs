//! `SessionBroker` over gRPC: each method converts, calls the broker, converts back.

use super::convert;
use super::pb::{self, session_broker_server::SessionBroker};
use crate::broker::{Broker, StartLogin};
use crate::policy;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    pub fn new(broker: Arc<Broker>) -> Self {
        BrokerService { broker }
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl SessionBroker for BrokerService {
    async fn start_login(
        &self,
        request: Request<pb::StartLoginRequest>,
    ) -> Reply<pb::StartLoginResponse> {
        let req = StartLogin::try_from(request.into_inner())?;
        Ok(Response::new(self.broker.start_login(req).await?.into()))
    }

    async fn exchange_code(
        &self,
        request: Request<pb::ExchangeCodeRequest>,
    ) -> Reply<pb::ExchangeCodeResponse> {
        Ok(Response::new(
            self.broker
                .exchange_code(request.into_inner().into())
                .await?
                .into(),
        ))
    }

    async fn get_current_aal(
        &self,
        request: Request<pb::GetCurrentAalRequest>,
    ) -> Reply<pb::GetCurrentAalResponse> {
        let pb::GetCurrentAalRequest { session_token } = request.into_inner();
        Ok(Response::new(
            self.broker.get_session(&session_token).await?.into(),
        ))
    }

    async fn get_session(&self, request: Request<pb::GetSessionRequest>) -> Reply<pb::Session> {
        let pb::GetSessionRequest { session_token } = request.into_inner();
        Ok(Response::new(
            self.broker.get_session(&session_token).await?.into(),
        ))
    }

    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Reply<pb::CheckAccessResponse> {
        let pb::CheckAccessRequest { session_token, api } = request.into_inner();
        Ok(Response::new(
            self.broker.check_access(&session_token, &api).await?.into(),
        ))
    }

    async fn get_pds_token(&self, request: Request<pb::GetPdsTokenRequest>) -> Reply<pb::ApiToken> {
        let pb::GetPdsTokenRequest {
            session_token,
            min_validity,
        } = request.into_inner();
        let min_validity = convert::min_validity(min_validity)?;
        let token = self
            .broker
            .get_api_token(&session_token, policy::PDS, min_validity)
            .await?;
        Ok(Response::new(token.into()))
    }
    async fn get_api_token(&self, request: Request<pb::GetApiTokenRequest>) -> Reply<pb::ApiToken> {
        let pb::GetApiTokenRequest {
            session_token,
            api,
            min_validity,
        } = request.into_inner();
        let min_validity = convert::min_validity(min_validity)?;
        let token = self
            .broker
            .get_api_token(&session_token, &api, min_validity)
            .await?;
        Ok(Response::new(token.into()))
    }
    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Reply<pb::LogoutResponse> {
        let pb::LogoutRequest {
            session_token,
            post_logout_redirect_uri,
        } = request.into_inner();
        let redirect = (!post_logout_redirect_uri.is_empty()).then_some(post_logout_redirect_uri);
        let out = self
            .broker
            .logout(&session_token, redirect.as_deref())
            .await?;
        Ok(Response::new(out.into()))
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Reply<pb::ListUserSessionsResponse> {
        let pb::ListUserSessionsRequest { uid } = request.into_inner();
        let sessions = self.broker.list_user_sessions(&uid).await?;
        Ok(Response::new(pb::ListUserSessionsResponse {
            sessions: sessions.into_iter().map(pb::Session::from).collect(),
        }))
    }

    async fn revoke_user_sessions(
        &self,
        request: Request<pb::RevokeUserSessionsRequest>,
    ) -> Reply<pb::RevokeUserSessionsResponse> {
        let pb::RevokeUserSessionsRequest { uid } = request.into_inner();
        let revoked = self.broker.revoke_user_sessions(&uid).await?;
        Ok(Response::new(pb::RevokeUserSessionsResponse { revoked }))
    }

    async fn list_api_policies(
        &self,
        _request: Request<pb::ListApiPoliciesRequest>,
    ) -> Reply<pb::ListApiPoliciesResponse> {
        let policies = self
            .broker
            .policy()
            .iter()
            .map(pb::ApiPolicy::from)
            .collect();
        Ok(Response::new(pb::ListApiPoliciesResponse { policies }))
    }
}
