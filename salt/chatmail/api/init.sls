{#- The control API (chatmail_api), one file per job:
    tokens.sls            bearer tokens, root-only, never in api.json
    settings.sls          api.json (and the DKIM public key for GET /dns)
    account-creation.sls  /etc/chatmail-nocreate as a link the API may switch
    stats.sls             account counts and storage, a scheduled job as vmail
    queue.sls             OpenSMTPD's queue listing, a scheduled job as root
    adminctl.sls          the block list and chatmail-adminctl, the privileged half of
                          /accounts (as vmail) and /queue (as root), socket-activated
    daemon.sls            the API's unit (or rc.d script) and service
    The API runs as chatmail.users.api in a sandbox (ProtectSystem=strict, no
    capabilities) and never reads mailboxes. #}
{%- from "chatmail/map.jinja" import chatmail with context %}

include:
  - chatmail.api.tokens
  - chatmail.api.settings
  - chatmail.api.account-creation
  - chatmail.api.stats
{%- if chatmail.mta == "opensmtpd" %}
  - chatmail.api.queue
{%- endif %}
{%- if chatmail.init == "systemd" %}
  - chatmail.api.adminctl
{%- endif %}
  - chatmail.api.daemon
