{#- The relay's Python code (chatmaild, chatmail_api, chatmail_www: one distribution)
    in a venv, chatmail.ini, and the daemons Dovecot and Postfix talk to.

    The source comes from the Salt fileserver: the minion's file_roots hold the
    formula (<checkout>/salt) and the checkout itself (<checkout>), so salt://chatmaild
    is the checkout's chatmaild/. It is copied to chatmail.paths.src and pip-installed
    when it changed; a marker file records a finished install, so a failed pip run is
    retried on the next apply. Daemons restart when their code or chatmail.ini change. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/files/limits.jinja" import login_class with context %}
{%- set paths = chatmail.paths %}
{%- set u = chatmail.users %}
{%- set s = chatmail.settings %}
{%- set venv = paths.venv %}
{%- set ini = paths.ini %}
{%- set marker = venv ~ "/.chatmail-installed" %}
{%- set units = paths.systemd_units %}

include:
  - chatmail.packages
  - chatmail.users
  - chatmail.checks

{%- set sources = [("chatmaild", "chatmaild"), ("api", "api"), ("www", "www")] %}
{%- for source, target in sources %}

chatmail-chatmaild-source-{{ target }}:
  file.recurse:
    - name: {{ paths.src }}/{{ target }}
    - source: salt://{{ source }}
    - clean: True
    - exclude_pat: "E@(^|/)(__pycache__|node_modules|\\.pytest_cache)(/|$)|\\.pyc$"
    - dir_mode: "0755"
    - file_mode: "0644"
    - makedirs: True
    - onchanges_in:
      - file: chatmail-chatmaild-source-changed
{%- endfor %}
{%- for name in ["pyproject.toml", "README.md"] %}

chatmail-chatmaild-source-{{ name | replace(".", "-") }}:
  file.managed:
    - name: {{ paths.src }}/{{ name }}
    - source: salt://{{ name }}
    - mode: "0644"
    - makedirs: True
    - onchanges_in:
      - file: chatmail-chatmaild-source-changed
{%- endfor %}

chatmail-chatmaild-source-changed:
  file.absent:
    - name: {{ marker }}

chatmail-chatmaild-venv-create:
  cmd.run:
    - name: python3 -m venv {{ venv }}
    - creates: {{ venv }}/bin/python
    - require:
      - pkg: chatmail-packages

{#- Dependencies first (a normal install), then our package again without touching
    them: pip would otherwise keep an installed copy of the same version. #}
chatmail-chatmaild-venv:
  cmd.run:
    - name: >-
        {{ venv }}/bin/pip install --quiet --disable-pip-version-check '{{ paths.src }}[api,www]' &&
        {{ venv }}/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall '{{ paths.src }}' &&
        touch {{ marker }}
    - creates: {{ marker }}
    - require:
      - cmd: chatmail-chatmaild-venv-create
      - file: chatmail-chatmaild-source-changed

chatmail-chatmaild-ini:
  file.managed:
    - name: {{ ini }}
    - source: salt://chatmail/chatmaild/files/chatmail.ini.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: {{ venv }}/bin/python -c "import sys; from chatmaild.config import load_config; load_config(sys.argv[1])"
    - require:
      - cmd: chatmail-chatmaild-venv

chatmail-chatmaild-mailboxes:
  file.directory:
    - name: {{ paths.mailboxes }}
    - user: {{ u.vmail }}
    - group: {{ u.vmail_group }}
    - mode: "0700"
    - makedirs: True
    - require:
      - user: chatmail-users-vmail

{#- The counters' parent stays world-traversable (nginx reads the web state's files
    beside them); makedirs alone would give it the counters' owner and 2750. #}
chatmail-chatmaild-counters-parent:
  file.directory:
    - name: {{ salt["file.dirname"](paths.counters) }}
    - mode: "0755"
    - makedirs: True

{#- Counters: written by the daemons (vmail), read by the control API's group. #}
chatmail-chatmaild-counters:
  file.directory:
    - name: {{ paths.counters }}
    - user: {{ u.vmail }}
    - group: {{ u.api_group }}
    - mode: "2750"
    - makedirs: True
    - require:
      - user: chatmail-users-vmail
      - group: chatmail-users-api-group
      - file: chatmail-chatmaild-counters-parent

{%- if chatmail.api.account_creation_pin is sameas true %}

chatmail-chatmaild-nocreate:
  file.absent:
    - name: {{ paths.nocreate }}
{%- elif chatmail.api.account_creation_pin is sameas false %}

chatmail-chatmaild-nocreate:
  file.managed:
    - name: {{ paths.nocreate }}
    - contents: "account creation disabled by the Salt pillar (chatmail:api:account_creation_pin)"
    - replace: False
{%- endif %}

chatmail-chatmaild-version:
  file.managed:
    - name: {{ paths.version_file }}
    - contents: {{ chatmail.version | json }}
    - mode: "0644"

{%- set bin = venv ~ "/bin/" %}
{%- set mailboxes_rw = [paths.mailboxes, paths.counters] %}
{%- set daemons = {
      "doveauth": {
        "description": "chatmail doveauth: Dovecot passdb/userdb, creates accounts on first login",
        "exec_start": bin ~ "doveauth /run/doveauth/doveauth.socket " ~ ini,
        "runtime_dir": "doveauth", "read_write_paths": mailboxes_rw, "protect_home": "no",
        "wants_network": false},
      "chatmail-metadata": {
        "description": "chatmail metadata: IMAP METADATA and push notifications",
        "exec_start": bin ~ "chatmail-metadata /run/chatmail-metadata/metadata.socket " ~ ini,
        "runtime_dir": "chatmail-metadata", "read_write_paths": mailboxes_rw, "protect_home": "no",
        "wants_network": true},
      "lastlogin": {
        "description": "chatmail lastlogin: records the day of each account's last login",
        "exec_start": bin ~ "lastlogin /run/chatmail-lastlogin/lastlogin.socket " ~ ini,
        "runtime_dir": "chatmail-lastlogin", "read_write_paths": mailboxes_rw, "protect_home": "no",
        "wants_network": false},
      "filtermail": {
        "description": "chatmail filtermail (outgoing): only encrypted mail leaves",
        "exec_start": bin ~ "filtermail " ~ ini ~ " outgoing",
        "runtime_dir": "", "read_write_paths": [paths.counters], "protect_home": "yes",
        "wants_network": false},
      "chatmail-logcounter": {
        "description": "chatmail logcounter: upstream's mtail counters from the journal",
        "exec_start": bin ~ "chatmail-logcounter " ~ ini,
        "runtime_dir": "", "read_write_paths": [paths.counters], "protect_home": "yes",
        "supplementary_groups": ["systemd-journal"], "wants_network": false},
      "filtermail-incoming": {
        "description": "chatmail filtermail (incoming): DKIM alignment and encryption",
        "exec_start": bin ~ "filtermail " ~ ini ~ " incoming",
        "runtime_dir": "", "read_write_paths": [paths.counters], "protect_home": "read-only",
        "wants_network": true},
      "mxdeliv": {
        "description": "chatmail mxdeliv: other relays deliver over HTTPS (POST /mxdeliv)",
        "exec_start": bin ~ "chatmail-mxdeliv " ~ ini,
        "runtime_dir": "", "read_write_paths": [paths.counters], "protect_home": "read-only",
        "wants_network": true},
      "mxtransport": {
        "description": "chatmail mxtransport: the MTA's transport to other relays, HTTPS first, then SMTP",
        "exec_start": bin ~ "chatmail-mxtransport " ~ ini ~ " --mta " ~ chatmail.mta,
        "runtime_dir": "", "read_write_paths": [paths.counters], "protect_home": "yes",
        "wants_network": true},
    } %}
{#- The service file per init system comes from the map (chatmail.init_files): a systemd
    unit, or an rc.d script on OpenBSD (whose service names cannot contain "-"). #}
{%- set init = chatmail.init_files[chatmail.init] %}
{%- for name, unit in daemons | dictsort if chatmail.daemons[name] %}
{%-   set service = name | replace("-", init.name_separator) %}

chatmail-chatmaild-{{ name }}-unit:
  file.managed:
    - name: {{ init.dir }}/{{ service }}{{ init.suffix }}
    - source: {{ init.template }}
    - template: jinja
    - context: {{ dict(unit, unit=name) | json }}
    - mode: "{{ init.mode }}"
    - check_cmd: {{ init.check_cmd | replace("{check_config}", paths.check_config) | replace("{file}", service ~ init.suffix) }}
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-checks-script
{%-   if init.reload %}
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-chatmaild-{{ name }}-unit
{%-   else %}
{{ login_class("chatmail-chatmaild-" ~ name ~ "-login-class", service, name) }}
{%-   endif %}

chatmail-chatmaild-{{ name }}-service:
  service.running:
    - name: {{ service }}
    - enable: True
    - require:
      - file: chatmail-chatmaild-mailboxes
      - file: chatmail-chatmaild-counters
    - watch:
{%-   if init.reload %}
      - module: chatmail-chatmaild-{{ name }}-unit
{%-   endif %}
      - file: chatmail-chatmaild-{{ name }}-unit
{%-   if not init.reload %}
      - file: chatmail-chatmaild-{{ name }}-login-class
{%-   endif %}
      - file: chatmail-chatmaild-ini
      - cmd: chatmail-chatmaild-venv
{%- endfor %}
{#- Daemons the map turns off (filtermail under OpenSMTPD): stopped and removed if an
    earlier apply installed them; nothing to do on a fresh host. #}
{%- for name, unit in daemons | dictsort if not chatmail.daemons[name] %}
{%-   set service = name | replace("-", init.name_separator) %}

chatmail-chatmaild-{{ name }}-service:
  service.dead:
    - name: {{ service }}
    - enable: False
    # Only where an earlier apply installed it: a dry run then shows nothing pending.
    - onlyif: test -e {{ init.dir }}/{{ service }}{{ init.suffix }}

chatmail-chatmaild-{{ name }}-unit:
  file.absent:
    - name: {{ init.dir }}/{{ service }}{{ init.suffix }}
    - require:
      - service: chatmail-chatmaild-{{ name }}-service
{%- endfor %}
