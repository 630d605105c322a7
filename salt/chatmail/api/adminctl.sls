{#- The block list and chatmail-adminctl, the privileged half of the operator's tools:
    one socket per scope, which only root and the API's group may connect to, each
    activating a small sandboxed service with a fixed set of operations:
      accounts  as vmail: account info, block, unblock, delete (chatmaild.accountadmin)
      queue     as root (deleting from Postfix's or OpenSMTPD's queue needs it): list,
                flush, delete one message (chatmaild.mailqueue)
    The block list sits in a vmail:<api group> 2750 directory: the tool writes it, the
    daemons (all vmail) and the API read it. Salt's chatmail.* module talks to the same
    sockets. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/api/common.jinja" import accounts_socket, queue_socket with context %}
{%- set paths = chatmail.paths %}
{%- set units = paths.systemd_units %}
{%- set bin = paths.venv ~ "/bin/chatmail-adminctl" %}
{%- set blocklist_dir = salt["file.dirname"](paths.blocklist) %}

include:
  - chatmail.users
  - chatmail.chatmaild
  - chatmail.checks

chatmail-api-blocklist-dir:
  file.directory:
    - name: {{ blocklist_dir }}
    - user: {{ chatmail.users.vmail }}
    - group: {{ chatmail.users.api_group }}
    # setgid: the list the tool writes stays readable by the API's group
    - mode: "2750"
    - makedirs: True
    - require:
      - user: chatmail-users-vmail
      - group: chatmail-users-api-group
{%- if chatmail.mta == "postfix" %}
{#-   root without these cannot enter Postfix's queue (postfix-owned, 0700) nor let
      postsuper switch to the mail owner; postqueue lists interfaces (AF_NETLINK).
      Under NoNewPrivileges Debian 13's postsuper (Postfix 3.10) fails that switch
      ("setuid(102): Operation not permitted"): off for this scope, whose root stays
      bounded by the capability set below. #}
{%-   set queue = {"read_write_paths": [chatmail.postfix.queue_directory], "group": "root",
                   "no_new_privileges": "no",
                   "capabilities": "CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_CHOWN CAP_SETUID CAP_SETGID",
                   "address_families": "AF_UNIX AF_NETLINK"} %}
{%- else %}
{#-   smtpd checks the control socket's peer uid, not capabilities; smtpctl insists on
      running as its setgid group, which NoNewPrivileges would drop #}
{%-   set queue = {"read_write_paths": [], "group": chatmail.opensmtpd.queue_group,
                   "capabilities": ""} %}
{%- endif %}
{%- set scopes = {
      "accounts": {"socket": accounts_socket, "user": chatmail.users.vmail,
                   "group": chatmail.users.vmail_group, "protect_home": "no",
                   "read_write_paths": [paths.mailboxes, blocklist_dir],
                   "description": "chatmail-adminctl accounts: info, block, unblock, delete"},
      "queue": dict(queue, socket=queue_socket, user="root", protect_home="yes",
                    description="chatmail-adminctl queue: list, flush, delete a message"),
    } %}
{%- for scope, spec in scopes | dictsort %}
{%-   set unit = "chatmail-adminctl-" ~ scope %}

chatmail-api-adminctl-{{ scope }}-service-unit:
  file.managed:
    - name: {{ units }}/{{ unit }}.service
    - source: salt://chatmail/api/files/chatmail-adminctl.service.jinja
    - template: jinja
    - context: {{ dict(spec, scope=scope, unit=unit, exec_start=bin ~ " " ~ scope ~ " " ~ paths.ini ~ " --mta " ~ chatmail.mta) | json }}
    - mode: "0644"
    - check_cmd: {{ paths.check_config }} unit {{ unit }}.service
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-checks-script

chatmail-api-adminctl-{{ scope }}-socket-unit:
  file.managed:
    - name: {{ units }}/{{ unit }}.socket
    - source: salt://chatmail/api/files/chatmail-adminctl.socket.jinja
    - template: jinja
    - context: {{ {"scope": scope, "socket": spec.socket} | json }}
    - mode: "0644"
    - check_cmd: {{ paths.check_config }} unit {{ unit }}.socket
    - require:
      - file: chatmail-api-adminctl-{{ scope }}-service-unit

chatmail-api-adminctl-{{ scope }}-units-reload:
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-api-adminctl-{{ scope }}-service-unit
      - file: chatmail-api-adminctl-{{ scope }}-socket-unit

{#- A running instance serves old code until it stops, and systemd refuses to (re)start a
    socket whose Accept=no service is still running: stopped first, the socket starts it
    again with the next request. #}
chatmail-api-adminctl-{{ scope }}-stop:
  cmd.run:
    - name: systemctl stop {{ unit }}.service
    - onchanges:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-chatmaild-ini
      - file: chatmail-api-adminctl-{{ scope }}-service-unit
      - file: chatmail-api-adminctl-{{ scope }}-socket-unit
    - require:
      - module: chatmail-api-adminctl-{{ scope }}-units-reload

chatmail-api-adminctl-{{ scope }}-socket:
  service.running:
    - name: {{ unit }}.socket
    - enable: True
    - require:
      - file: chatmail-api-blocklist-dir
      - cmd: chatmail-api-adminctl-{{ scope }}-stop
    - watch:
      - file: chatmail-api-adminctl-{{ scope }}-socket-unit
{%- endfor %}
