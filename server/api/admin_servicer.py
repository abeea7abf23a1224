"""AdminService: validate the request, call the domain, convert the result."""

from __future__ import annotations

import grpc
from twofactor.v1 import admin_service_pb2 as pb
from twofactor.v1 import admin_service_pb2_grpc as pb_grpc

from twofactor_server.api import convert, requests
from twofactor_server.api.interceptors import current_caller
from twofactor_server.domain.errors import InvalidArgument
from twofactor_server.settings import PolicySettings
from twofactor_server.usecases.admin import Admin

_FILTERS = {pb.USER_FILTER_UNSPECIFIED: None, pb.USER_FILTER_ENABLED: True, pb.USER_FILTER_NOT_ENABLED: False}


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin, policy: PolicySettings) -> None:
        self._admin = admin
        self._policy = policy

    def GetUser(self, request: pb.GetUserRequest, context: grpc.ServicerContext) -> pb.GetUserResponse:
        return pb.GetUserResponse(user=convert.user(self._admin.get_user(requests.user_id(request.user_id))))

    def ListUsers(self, request: pb.ListUsersRequest, context: grpc.ServicerContext) -> pb.ListUsersResponse:
        if request.filter not in _FILTERS:
            raise InvalidArgument("INVALID_FILTER", "filter must be a UserFilter value")
        users, token = self._admin.list_users(
            page_size=request.page_size, page_token=request.page_token, enabled=_FILTERS[request.filter]
        )
        return pb.ListUsersResponse(users=[convert.user(u) for u in users], next_page_token=token)

    def ResetUser(self, request: pb.ResetUserRequest, context: grpc.ServicerContext) -> pb.ResetUserResponse:
        state = self._admin.reset_user(
            requests.user_id(request.user_id),
            reason=requests.bounded(
                request.reason,
                field="reason",
                reason="INVALID_REASON",
                max_bytes=requests.MAX_REASON_BYTES,
                required=True,
            ),
            caller=current_caller.get(),
        )
        return pb.ResetUserResponse(user=convert.user(state))

    def UnlockUser(
        self, request: pb.UnlockUserRequest, context: grpc.ServicerContext
    ) -> pb.UnlockUserResponse:
        state = self._admin.unlock_user(requests.user_id(request.user_id), caller=current_caller.get())
        return pb.UnlockUserResponse(user=convert.user(state))

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> pb.GetPolicyResponse:
        return pb.GetPolicyResponse(policy=convert.policy(self._policy))

    def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        user_id = requests.user_id(request.user_id) if request.user_id else ""
        since, until = requests.time_range(
            request.since if request.HasField("since") else None,
            request.until if request.HasField("until") else None,
        )
        events, token = self._admin.list_audit_events(
            user_id=user_id,
            page_size=request.page_size,
            page_token=request.page_token,
            actions=requests.audit_actions(list(request.actions)),
            since_ms=since,
            until_ms=until,
        )
        return pb.ListAuditEventsResponse(
            events=[convert.audit_event(e) for e in events], next_page_token=token
        )
