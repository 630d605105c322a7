{#- The control API (chatmail_api): settings, tokens, the nocreate hand-over, units.

    Privileges, kept to what each job needs:
    - The API runs as chatmail.users.api in a sandbox (ProtectSystem=strict, no
      capabilities). It reads the counters through its group (chatmail.chatmaild makes that
      directory vmail:<api group> 2750) and never reads mailboxes: a oneshot timer running
      as vmail counts accounts and storage into a small file the API reads.
    - Account creation: doveauth refuses new accounts while paths.nocreate exists. That
      path is a symlink into api.account_creation_dir, owned by the API user and the only
      path its unit may write (ReadWritePaths), so the API toggles creation by creating or
      removing the link's target; it never needs write access to /etc. An operator's
      `touch /etc/chatmail-nocreate` still works (it creates the target through the link).
      A plain file found at paths.nocreate is moved behind the link, keeping it closed.
      With api.account_creation_pin set, chatmail.chatmaild owns the path instead and the
      API answers 409 to changes.
    - Tokens never sit in api.json: api.tokens_file (root, 0600) holds the pillar's tokens
      or, if the pillar has none, tokens generated here once; systemd hands the file to the
      service (LoadCredential) and the API reads it from $CREDENTIALS_DIRECTORY.
    - Postfix: `postqueue -j` needs the postdrop group (NoNewPrivileges stops its setgid).
      OpenSMTPD lists its queue to root only: a root oneshot (timer or cron) writes
      `smtpctl show queue` every minute into a root:<api group> 2750 directory. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set api = chatmail.api %}
{%- set paths = chatmail.paths %}
{%- set u = chatmail.users %}
{%- set venv = paths.venv %}
{%- set units = paths.systemd_units %}
{%- set systemd = chatmail.init == "systemd" %}
{%- set pinned = api.account_creation_pin is not none %}
{%- set stats_file = api.stats_dir ~ "/stats.json" %}
{%- set smtpd_queue = chatmail.mta == "opensmtpd" %}
{%- set queue_dir = salt["file.dirname"](api.stats_dir) ~ "/smtpd-queue" %}
{%- set queue_snapshot = queue_dir ~ "/queue.txt" %}
{#- written whole, then renamed: the API never reads half a listing #}
{%- set queue_writer = "smtpctl show queue > " ~ queue_snapshot ~ ".tmp && mv " ~ queue_snapshot ~ ".tmp " ~ queue_snapshot %}
{%- set pillar_tokens = (api.tokens.monitor or {}) | length + (api.tokens.admin or {}) | length %}

include:
  - chatmail.users
  - chatmail.chatmaild
  - chatmail.checks
{%- if chatmail.dkim.enabled %}
  - chatmail.dkim
{%- endif %}

chatmail-api-config-dir:
  file.directory:
    - name: {{ salt["file.dirname"](api.settings_file) }}
    - user: root
    - mode: "0755"
    - makedirs: True

{#- ---- tokens --------------------------------------------------------------------- #}
{%- if pillar_tokens %}

chatmail-api-tokens:
  file.serialize:
    - name: {{ api.tokens_file }}
    - dataset: {{ {"monitor": api.tokens.monitor or {}, "admin": api.tokens.admin or {}} | json }}
    - serializer: json
    - user: root
{%-   if not systemd %}
    - group: {{ u.api_group }}
{%-   endif %}
    - mode: "{{ "0600" if systemd else "0640" }}"
    - require:
      - file: chatmail-api-config-dir
{%- else %}

chatmail-api-tokens:
  cmd.run:
    - name: >-
        {{ venv }}/bin/python -c 'import json, secrets;
        print(json.dumps({scope: {scope: secrets.token_urlsafe(32)} for scope in ("monitor", "admin")}))'
        > {{ api.tokens_file }}
    - umask: "077"
    - creates: {{ api.tokens_file }}
    - require:
      - file: chatmail-api-config-dir
      - cmd: chatmail-chatmaild-venv
{%-   if not systemd %}

chatmail-api-tokens-group:
  file.managed:
    - name: {{ api.tokens_file }}
    - replace: False
    - user: root
    - group: {{ u.api_group }}
    - mode: "0640"
    - require:
      - cmd: chatmail-api-tokens
{%-   endif %}
{%- endif %}

{#- ---- settings ------------------------------------------------------------------- #}
{%- set services = [chatmail.service.postfix if chatmail.mta == "postfix" else chatmail.service.opensmtpd,
                    chatmail.service.dovecot, chatmail.service[chatmail.web.server], chatmail.service.unbound] %}
{%- if chatmail.dkim.enabled and chatmail.dkim.signer == "opendkim" %}
{%-   do services.append(chatmail.service.opendkim) %}
{%- endif %}
{%- for daemon in ["doveauth", "chatmail-metadata", "lastlogin", "filtermail", "filtermail-incoming"] if chatmail.daemons[daemon] %}
{%-   do services.append(daemon | replace("-", chatmail.init_files[chatmail.init].name_separator)) %}
{%- endfor %}
{%- set service_specs = [] %}
{%- for name in services %}
{%-   do service_specs.append({"name": name | replace("-", chatmail.init_files[chatmail.init].name_separator)}) %}
{%- endfor %}
{%- set settings = {
      "chatmail_ini": paths.ini,
      "listen": api.listen,
      "port": api.port,
      "state_dir": "/var/lib/chatmail-api",
      "allow": api.allow,
      "public_health": api.public_health,
      "account_creation_pin": api.account_creation_pin,
      "version_file": paths.version_file,
      "tls_cert": chatmail.tls.cert,
      "service_manager": "systemd" if systemd else "rcctl",
      "mta": chatmail.mta,
      "services": service_specs,
      "queue_command": ["postqueue", "-j"] if chatmail.mta == "postfix" else ["smtpctl", "show", "queue"],
      "queue_snapshot": queue_snapshot if smtpd_queue else none,
      "account_stats_file": stats_file,
      "account_scan_interval_s": 60,
      "dns": {"dkim_selector": chatmail.dkim.selector, "dkim_txt": api.dkim_public},
      "probe": {"enabled": true, "interval_s": api.probe_interval,
                "submission_port": chatmail.ports.submission, "imap_port": chatmail.ports.imaps},
    } %}

chatmail-api-settings:
  file.serialize:
    - name: {{ api.settings_file }}
    - dataset: {{ settings | json }}
    - serializer: json
    - user: root
    - mode: "0644"
    - require:
      - file: chatmail-api-config-dir

{#- ---- account creation hand-over ------------------------------------------------- #}

chatmail-api-account-creation-dir:
  file.directory:
    - name: {{ api.account_creation_dir }}
    - user: {{ u.api }}
    - group: {{ u.api_group }}
    - mode: "0755"
    - makedirs: True
    - require:
      - user: chatmail-users-api
{%- if not pinned %}

chatmail-api-nocreate-adopt:
  cmd.run:
    - name: mv -f {{ paths.nocreate }} {{ api.account_creation_dir }}/nocreate
    - onlyif: test -e {{ paths.nocreate }} -a ! -L {{ paths.nocreate }}
    - require:
      - file: chatmail-api-account-creation-dir

{#- No link but a target: the operator removed /etc/chatmail-nocreate (the link) to
    allow account creation again; keep it that way when the link comes back. #}
chatmail-api-nocreate-removed:
  file.absent:
    - name: {{ api.account_creation_dir }}/nocreate
    - onlyif: test ! -e {{ paths.nocreate }} -a ! -L {{ paths.nocreate }}
    - require:
      - cmd: chatmail-api-nocreate-adopt

chatmail-api-nocreate-link:
  file.symlink:
    - name: {{ paths.nocreate }}
    - target: {{ api.account_creation_dir }}/nocreate
    - require:
      - cmd: chatmail-api-nocreate-adopt
      - file: chatmail-api-nocreate-removed
{%- endif %}

{#- ---- DKIM public key for GET /dns ------------------------------------------------ #}
{%- if chatmail.dkim.enabled %}
{%-   set dkim_txt = chatmail.dkim.key_dir ~ "/" ~ chatmail.dkim.selector ~ ".txt" %}

chatmail-api-dkim-public:
  cmd.run:
    - name: install -m 0644 -o 0 -g 0 {{ dkim_txt }} {{ api.dkim_public }}
    - unless: cmp -s {{ dkim_txt }} {{ api.dkim_public }}
    - require:
      - cmd: chatmail-dkim-key
      - file: chatmail-api-config-dir
{%- endif %}

{#- ---- account statistics (as vmail) ----------------------------------------------- #}

chatmail-api-stats-dir:
  file.directory:
    - name: {{ api.stats_dir }}
    - user: {{ u.vmail }}
    - group: {{ u.api_group }}
    - mode: "2750"
    - makedirs: True
    - require:
      - user: chatmail-users-vmail
      - group: chatmail-users-api-group
{%- if systemd %}

chatmail-api-stats-unit:
  file.managed:
    - name: {{ units }}/chatmail-account-stats.service
    - source: salt://chatmail/chatmaild/files/daemon.service.jinja
    - template: jinja
    - context:
        description: "chatmail account statistics for the control API's /metrics"
        exec_start: {{ venv }}/bin/chatmail-accountstats {{ paths.ini }} {{ stats_file }}
        type: oneshot
        restart: false
        timer: true
        runtime_dir: ""
        read_write_paths: [{{ api.stats_dir }}]
        protect_home: read-only
        wants_network: false
    - mode: "0644"
    - check_cmd: {{ paths.check_config }} unit chatmail-account-stats.service
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-checks-script

chatmail-api-stats-timer-unit:
  file.managed:
    - name: {{ units }}/chatmail-account-stats.timer
    - source: salt://chatmail/api/files/chatmail-account-stats.timer.jinja
    - template: jinja
    - mode: "0644"

chatmail-api-units-reload:
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-api-stats-unit
      - file: chatmail-api-stats-timer-unit
      - file: chatmail-api-unit

chatmail-api-stats-timer:
  service.running:
    - name: chatmail-account-stats.timer
    - enable: True
    - require:
      - file: chatmail-api-stats-dir
      - module: chatmail-api-units-reload
    - watch:
      - file: chatmail-api-stats-timer-unit

{#- ---- OpenSMTPD's queue listing (as root) ---------------------------------------- #}
{%- if smtpd_queue %}

chatmail-api-smtpd-queue-dir:
  file.directory:
    - name: {{ queue_dir }}
    - user: root
    - group: {{ u.api_group }}
    # setgid: the listing is written with smtpctl's group and must stay the API's
    - mode: "2750"
    - makedirs: True
    - require:
      - group: chatmail-users-api-group
{%-   if systemd %}

chatmail-api-smtpd-queue-unit:
  file.managed:
    - name: {{ units }}/chatmail-smtpd-queue.service
    - source: salt://chatmail/api/files/chatmail-smtpd-queue.service.jinja
    - template: jinja
    - context:
        command: {{ queue_writer | yaml_dquote }}
        queue_dir: {{ queue_dir }}
    - mode: "0644"
    - check_cmd: {{ paths.check_config }} unit chatmail-smtpd-queue.service
    - require:
      - file: chatmail-checks-script

chatmail-api-smtpd-queue-timer-unit:
  file.managed:
    - name: {{ units }}/chatmail-smtpd-queue.timer
    - source: salt://chatmail/api/files/chatmail-smtpd-queue.timer
    - mode: "0644"

chatmail-api-smtpd-queue-units-reload:
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-api-smtpd-queue-unit
      - file: chatmail-api-smtpd-queue-timer-unit

chatmail-api-smtpd-queue-timer:
  service.running:
    - name: chatmail-smtpd-queue.timer
    - enable: True
    - require:
      - file: chatmail-api-smtpd-queue-dir
      - module: chatmail-api-smtpd-queue-units-reload
    - watch:
      - file: chatmail-api-smtpd-queue-timer-unit
{%-   else %}

chatmail-api-smtpd-queue-cron:
  cron.present:
    - name: {{ queue_writer | yaml_dquote }}
    - user: root
    - require:
      - file: chatmail-api-smtpd-queue-dir
{%-   endif %}
{%- endif %}

{#- ---- the API service ----------------------------------------------------------- #}

chatmail-api-unit:
  file.managed:
    - name: {{ units }}/chatmail-api.service
    - source: salt://chatmail/api/files/chatmail-api.service.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: {{ paths.check_config }} unit chatmail-api.service
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-checks-script
{%- else %}

chatmail-api-unit:
  file.managed:
    - name: {{ chatmail.init_files.rcctl.dir }}/chatmail_api
    - source: {{ chatmail.init_files.rcctl.template }}
    - template: jinja
    - context:
        description: "chatmail control API"
        exec_start: {{ venv }}/bin/chatmail-api --settings {{ api.settings_file }} --tokens-file {{ api.tokens_file }}
        run_as: {{ u.api }}
        run_as_group: {{ u.api_group }}
    - mode: "{{ chatmail.init_files.rcctl.mode }}"
    - check_cmd: sh -n
    - require:
      - cmd: chatmail-chatmaild-venv

chatmail-api-stats-cron:
  cron.present:
    - name: {{ venv }}/bin/python -m chatmail_api.accountstats {{ paths.ini }} {{ stats_file }}
    - user: {{ u.vmail }}
    - minute: "*/5"
    - require:
      - file: chatmail-api-stats-dir
{%- endif %}

chatmail-api-service:
  service.running:
    - name: {{ "chatmail-api" if systemd else "chatmail_api" }}
    - enable: True
    - require:
      - file: chatmail-api-account-creation-dir
      - file: chatmail-chatmaild-counters
{%- if not pinned %}
      - file: chatmail-api-nocreate-link
{%- endif %}
    - watch:
      - file: chatmail-api-unit
{%- if systemd %}
      - module: chatmail-api-units-reload
{%- endif %}
      - file: chatmail-api-settings
      - {{ "file" if pillar_tokens else "cmd" }}: chatmail-api-tokens
      - file: chatmail-chatmaild-ini
      - cmd: chatmail-chatmaild-venv
