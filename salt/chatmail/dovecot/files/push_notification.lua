-- Managed by Salt (chatmail formula). Dovecot LMTP calls this for every delivered
-- message; setting /private/messagenew makes chatmail-metadata notify the recipient's
-- devices. A copy the sender keeps of its own message notifies nobody.
function dovecot_lua_notify_begin_txn(user)
  return user
end

function dovecot_lua_notify_event_message_new(user, event)
  local mbox = user:mailbox(event.mailbox)
  mbox:sync()
  if user.username ~= event.from_address then
    mbox:metadata_set("/private/messagenew", "")
  end
  mbox:free()
end

function dovecot_lua_notify_end_txn(ctx, success)
end
