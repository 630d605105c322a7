{#- Delta Chat calls through the relay's own TURN server: coturn from the distribution with
    TURN REST logins (use-auth-secret), and chatmail-turn-credentials, which hands such
    logins to chatmail-metadata on settings.turn_socket_path (the `turn` METADATA key).

    The secret is generated here once (turn.secret_file, root-only) and reaches both
    daemons through systemd's LoadCredential. coturn's config, secret and drop-in are in
    place before the package is installed, so the first start (by the package itself)
    already runs the relay's config: the stock one would relay without logins.
    coturn has no config validator (unknown lines are logged and skipped): the container
    tests check its log instead. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set t = chatmail.turn %}
{%- set units = chatmail.paths.systemd_units %}
{%- set check_unit = chatmail.paths.check_config ~ " unit" %}
{%- if t.enabled %}
{%-   if chatmail.init != "systemd" %}
{{-     raise("chatmail: turn:enabled needs systemd; set turn:enabled: false on " ~ grains["os"]) }}
{%-   endif %}

include:
  - chatmail.packages
  - chatmail.users
  - chatmail.chatmaild
  - chatmail.checks

chatmail-turn-secret:
  cmd.run:
    - name: >-
        install -d -m 0755 {{ salt["file.dirname"](t.secret_file) }} &&
        (umask 077 && openssl rand -hex 32 > {{ t.secret_file }}.tmp) &&
        mv {{ t.secret_file }}.tmp {{ t.secret_file }}
    - creates: {{ t.secret_file }}
    - require:
      - pkg: chatmail-packages

chatmail-turn-config:
  file.managed:
    - name: {{ t.config }}
    - source: salt://chatmail/turn/files/turnserver.conf.jinja
    - template: jinja
    - mode: "0644"
    - makedirs: True

chatmail-turn-config-helper:
  file.managed:
    - name: {{ t.config_helper }}
    - source: salt://chatmail/turn/files/coturn-config
    - mode: "0755"
    - makedirs: True

chatmail-turn-coturn-dropin:
  file.managed:
    - name: {{ units }}/{{ chatmail.service.turn }}.service.d/20-chatmail.conf
    - source: salt://chatmail/turn/files/coturn.dropin.conf.jinja
    - template: jinja
    - mode: "0644"
    - makedirs: True

chatmail-turn-credentials-socket-unit:
  file.managed:
    - name: {{ units }}/chatmail-turn-credentials.socket
    - source: salt://chatmail/turn/files/chatmail-turn-credentials.socket.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: {{ check_unit }} chatmail-turn-credentials.socket
    # verified with its service in place: a socket without one cannot start
    - require:
      - file: chatmail-checks-script
      - file: chatmail-turn-credentials-service-unit

chatmail-turn-credentials-service-unit:
  file.managed:
    - name: {{ units }}/chatmail-turn-credentials.service
    - source: salt://chatmail/turn/files/chatmail-turn-credentials.service.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: {{ check_unit }} chatmail-turn-credentials.service
    - require:
      - file: chatmail-checks-script
      - cmd: chatmail-chatmaild-venv

chatmail-turn-units-reload:
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-turn-coturn-dropin
      - file: chatmail-turn-credentials-socket-unit
      - file: chatmail-turn-credentials-service-unit

chatmail-turn-pkg:
  pkg.installed:
    - pkgs: {{ chatmail.pkgs.turn | json }}
{%-   if chatmail.pkg_install_recommends is not none %}
    - install_recommends: {{ chatmail.pkg_install_recommends }}
{%-   endif %}
    - require:
      - cmd: chatmail-turn-secret
      - file: chatmail-turn-config
      - file: chatmail-turn-config-helper
      - module: chatmail-turn-units-reload

chatmail-turn-service:
  service.running:
    - name: {{ chatmail.service.turn }}
    - enable: True
    - require:
      - pkg: chatmail-turn-pkg
    - watch:
      - cmd: chatmail-turn-secret
      - file: chatmail-turn-config
      - file: chatmail-turn-config-helper
      - file: chatmail-turn-coturn-dropin
      - module: chatmail-turn-units-reload

{#- systemd refuses to restart a socket while its Accept=no service runs: stopped first,
    chatmail-turn-credentials-service starts it again. #}
chatmail-turn-credentials-stop:
  cmd.run:
    - name: systemctl stop chatmail-turn-credentials.service
    - onchanges:
      - file: chatmail-turn-credentials-socket-unit
    - require:
      - module: chatmail-turn-units-reload

chatmail-turn-credentials-socket:
  service.running:
    - name: chatmail-turn-credentials.socket
    - enable: True
    - require:
      - user: chatmail-users-vmail
      - cmd: chatmail-turn-credentials-stop
    - watch:
      - file: chatmail-turn-credentials-socket-unit

{#- Started now and at boot rather than by the first connection, so /status sees it run;
    restarted when its code, unit or secret change. #}
chatmail-turn-credentials-service:
  service.running:
    - name: chatmail-turn-credentials.service
    - enable: True
    - require:
      - service: chatmail-turn-credentials-socket
    - watch:
      - cmd: chatmail-turn-secret
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-turn-credentials-service-unit
      - module: chatmail-turn-units-reload
{%- elif chatmail.init == "systemd" %}
{#- Turned off after an earlier apply turned it on: stopped and disabled. Nothing to do on
    a host that never had it (a dry run then shows nothing pending). #}

chatmail-turn-service:
  service.dead:
    - name: {{ chatmail.service.turn }}
    - enable: False
    - onlyif: test -e {{ units }}/{{ chatmail.service.turn }}.service.d/20-chatmail.conf

{%-   for unit in ["chatmail-turn-credentials.service", "chatmail-turn-credentials.socket"] %}

chatmail-turn-{{ unit | replace(".", "-") }}-off:
  service.dead:
    - name: {{ unit }}
    - enable: False
    - onlyif: test -e {{ units }}/{{ unit }}
{%-   endfor %}
{%- endif %}
