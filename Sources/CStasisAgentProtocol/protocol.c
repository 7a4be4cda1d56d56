// The protocol is a header; this file pins its message size, which both sides rely on.
#include "stasis_agent_protocol.h"

_Static_assert(sizeof(stasis_agent_message) == 256, "a control message is 256 bytes");
